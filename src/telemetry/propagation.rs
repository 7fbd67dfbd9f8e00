//! W3C trace context across Kafka: a span per input continuing the producer's trace, and the
//! trace headers each output carries.

struct HeaderExtractor<'a>(&'a crate::event::Headers);

impl opentelemetry::propagation::Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        crate::event::header_str(self.0, key)
    }
    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(k, _)| k.as_str()).collect()
    }
}

/// A span for one input, continuing the W3C trace from its headers.
pub(crate) fn image_span(headers: &crate::event::Headers, topic: &str, partition: i32, offset: i64) -> tracing::Span {
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let parent = opentelemetry::global::get_text_map_propagator(|p| p.extract(&HeaderExtractor(headers)));
    let span = tracing::info_span!("score_image", topic, partition, offset);
    let _ = span.set_parent(parent);
    span
}

/// Trace headers for an output: the span's context when tracing is on, else the input's own.
pub(crate) fn output_trace_headers(span: &tracing::Span, input: &crate::event::Headers) -> Vec<(String, String)> {
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let mut injected = std::collections::HashMap::new();
    let cx = span.context();
    opentelemetry::global::get_text_map_propagator(|p| p.inject_context(&cx, &mut injected));
    if injected.contains_key("traceparent") {
        return injected.into_iter().collect();
    }
    crate::event::trace_headers(input).into_iter().collect()
}
