//! OTLP tracing: the operator continues each input's W3C trace, exports its span to an OTLP/gRPC
//! collector (a real tonic server in this test) and carries the new context onto the score.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value::Value;

const READY: Duration = Duration::from_secs(120);

/// A received span: (service.name, span name, trace id, span id, parent span id), ids in hex.
type SpanRow = (String, String, String, String, String);

#[derive(Default, Clone)]
struct Collector(Arc<Mutex<Vec<SpanRow>>>);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(&self, request: tonic::Request<ExportTraceServiceRequest>) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
        for rs in request.into_inner().resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                    Value::StringValue(s) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for span in rs.scope_spans.into_iter().flat_map(|s| s.spans) {
                self.0.lock().unwrap().push((service.clone(), span.name, hex(&span.trace_id), hex(&span.span_id), hex(&span.parent_span_id)));
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

fn start_collector() -> (Collector, u16) {
    let collector = Collector::default();
    let port = free_port();
    let service = TraceServiceServer::new(collector.clone());
    std::thread::spawn(move || {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(tonic::transport::Server::builder().add_service(service).serve(([127, 0, 0, 1], port).into())).unwrap();
    });
    wait_for_port(port, Duration::from_secs(30), "OTLP collector");
    (collector, port)
}

#[test]
fn each_input_trace_is_continued_exported_and_carried_onto_its_score() {
    let _serial = serial();
    let (collector, port) = start_collector();
    let Scenario { broker, input, scores, dlq, tmp, .. } = Scenario::start(1);
    let (mut records, ids) = small_image_records(4, "traced");
    // Each camera event arrives inside its own trace.
    let mut parents = HashMap::new();
    for (i, r) in records.iter_mut().enumerate() {
        let (trace, span) = (format!("{:032x}", 0xabc000 + i), format!("{:016x}", 0x5000 + i));
        r.2.push(("traceparent".into(), format!("00-{trace}-{span}-01").into_bytes()));
        parents.insert(ids[i].clone(), (trace, span));
    }
    publish(&broker.producer(), &input, &records);

    let mut op = OperatorConfig::new(&broker.brokers, &input, &scores, &dlq, &unique("group"), tmp.path())
        .set("DCAM__HEATMAP__POLICY", "none")
        .set("DCAM__TELEMETRY__OTLP_ENDPOINT", format!("http://127.0.0.1:{port}"))
        .set("DCAM__TELEMETRY__SERVICE_NAME", "dcam-under-test")
        .spawn("traced");
    op.wait_ready(READY);
    let got = read_topic(&broker.brokers, &scores, ids.len(), Duration::from_secs(120));
    assert_eq!(got.len(), ids.len(), "{}", op.log_text());
    // SIGTERM flushes the batch exporter before exit.
    assert!(op.terminate(Duration::from_secs(60)).success());
    let deadline = Instant::now() + Duration::from_secs(30);
    while collector.0.lock().unwrap().iter().filter(|s| s.1 == "score_image").count() < ids.len() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let spans = collector.0.lock().unwrap().clone();

    for r in &got {
        let id = String::from_utf8(r.key.clone().unwrap()).unwrap();
        let (trace, parent) = &parents[&id];
        let tp = r.headers.get("traceparent").unwrap_or_else(|| panic!("{id}: score has no traceparent"));
        let parts: Vec<&str> = tp.split('-').collect();
        assert_eq!(parts.len(), 4, "{tp}");
        assert_eq!(parts[1], trace, "{id}: the score stays in the input's trace");
        assert_ne!(parts[2], parent, "{id}: the score's parent is the operator's span, not the camera's");
        let exported = spans.iter().find(|s| s.3 == parts[2]).unwrap_or_else(|| panic!("{id}: span {} not exported; got {spans:?}", parts[2]));
        assert_eq!(exported.0, "dcam-under-test");
        assert_eq!(exported.1, "score_image");
        assert_eq!(&exported.2, trace);
        assert_eq!(&exported.4, parent, "{id}: the operator's span is a child of the camera's");
    }
}
