//! `dcam-stream schema [NAME]`: the JSON Schemas of the records the operator reads and writes
//! (`schemas/`, compiled in), so a subscriber can fetch the ones of the version it runs against.

use anyhow::{bail, Result};

/// (name, schema text), in the order they are listed.
const SCHEMAS: &[(&str, &str)] = &[
    ("input", include_str!("../../schemas/input.json")),
    ("score", include_str!("../../schemas/score.json")),
    ("anomaly", include_str!("../../schemas/anomaly.json")),
    ("dead-letter", include_str!("../../schemas/dead-letter.json")),
    ("control", include_str!("../../schemas/control.json")),
    ("replay-summary", include_str!("../../schemas/replay-summary.json")),
    ("file-score", include_str!("../../schemas/file-score.json")),
];

#[derive(clap::Args)]
pub(super) struct Args {
    /// Which schema to print; without it, the names and titles of all of them.
    name: Option<String>,
}

pub(super) fn run(args: &Args) -> Result<()> {
    let Some(name) = &args.name else {
        for (name, text) in SCHEMAS {
            let title = serde_json::from_str::<serde_json::Value>(text)?["title"].as_str().unwrap_or_default().to_string();
            println!("{name:<15} {title}");
        }
        return Ok(());
    };
    match SCHEMAS.iter().find(|(n, _)| n == name) {
        Some((_, text)) => {
            print!("{text}");
            Ok(())
        }
        None => bail!("no schema {name:?}; one of: {}", SCHEMAS.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Latency, ModelRef, ScoreRecord, SourceRef, ThresholdSource, SCORE_SCHEMA_VERSION};
    use serde_json::Value;

    fn schema(name: &str) -> Value {
        serde_json::from_str(SCHEMAS.iter().find(|(n, _)| *n == name).unwrap().1).unwrap()
    }

    /// Every key the serializer writes is in the schema's `properties` (nested objects too), and
    /// every required property is written: a field added to the Rust type but not to the schema
    /// fails here.
    fn assert_matches(path: &str, written: &Value, schema: &Value) {
        let (Some(fields), Some(props)) = (written.as_object(), schema.get("properties").and_then(Value::as_object)) else {
            return;
        };
        for (key, value) in fields {
            let prop = props.get(key).unwrap_or_else(|| panic!("{path}.{key} is written but not in the schema"));
            assert_matches(&format!("{path}.{key}"), value, prop);
        }
        for required in schema.get("required").and_then(Value::as_array).into_iter().flatten() {
            let required = required.as_str().unwrap();
            assert!(fields.contains_key(required), "{path}.{required} is required by the schema but not written");
        }
    }

    #[test]
    fn the_score_record_writes_exactly_the_fields_of_its_schema() {
        let record = ScoreRecord {
            schema_version: SCORE_SCHEMA_VERSION,
            image_id: "cam-1/42".into(),
            class: Some("bottle".into()),
            score: 0.7,
            raw_score: 1.2,
            threshold: 1.0,
            threshold_source: ThresholdSource::Runtime,
            is_anomaly: true,
            heatmap_uri: Some("file:///tmp/h.png".into()),
            model: ModelRef { name: "m".into(), version: "1".into() },
            source: SourceRef { topic: "images".into(), partition: 1, offset: 2, timestamp: Some(3) },
            scored_at: "2026-12-06T10:00:00.000Z".into(),
            latency_ms: Latency { queue: 1.0, inference: 2.0, total: 3.0 },
            attributes: serde_json::json!({"line": "3"}),
        };
        let score = schema("score");
        assert_matches("score", &serde_json::to_value(&record).unwrap(), &score);
        assert_eq!(score["properties"]["schema_version"]["const"], SCORE_SCHEMA_VERSION, "the schema and the code name the same version");
    }

    #[test]
    fn the_replay_summary_writes_its_schemas_record() {
        let summary = crate::stream::replay::ReplaySummary {
            records: 5,
            scored: 4,
            anomalies: 1,
            dead_letters: 1,
            duration: std::time::Duration::from_millis(2500),
            ranges: [(0, (3, 6)), (1, (0, 2))].into(),
        };
        let written = serde_json::to_value(&summary).unwrap();
        assert_matches("replay-summary", &written, &schema("replay-summary"));
        assert_eq!(written["duration_s"], 2.5);
        assert_eq!(written["ranges"], serde_json::json!({"0": [3, 6], "1": [0, 2]}), "partitions as keys, [start, end) as pairs");
    }

    #[test]
    fn every_schema_parses_and_has_a_title_and_id() {
        for (name, text) in SCHEMAS {
            let v: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(v["title"].is_string() && v["$id"].is_string(), "{name} has a title and $id");
        }
    }
}
