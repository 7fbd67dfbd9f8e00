//! `docs/CONFIG.md`, the full settings reference, is generated from the settings types' doc
//! comments (`src/config.rs`) and the defaults (`config/default.toml`). This test fails when a
//! setting has no doc comment, when a key of one is missing from the other, or when the file is
//! stale. Regenerate it with `DCAM_BLESS=1 cargo test --test config_reference`.

use std::collections::BTreeMap;
use std::path::Path;

/// One field of a settings struct, as written in `src/config.rs`.
struct Field {
    key: String,
    rust_type: String,
    doc: String,
}

/// Every `pub struct *Settings` of `src/config.rs` with its fields, in source order.
fn settings_structs(source: &str) -> BTreeMap<String, Vec<Field>> {
    let mut structs = BTreeMap::new();
    let mut current: Option<(String, Vec<Field>)> = None;
    let (mut doc, mut rename) = (Vec::<String>::new(), None::<String>);
    for line in source.lines() {
        if let Some(name) = line.strip_prefix("pub struct ").and_then(|l| l.strip_suffix(" {")) {
            if name.ends_with("Settings") {
                current = Some((name.to_string(), Vec::new()));
                (doc, rename) = (Vec::new(), None);
            }
            continue;
        }
        let Some((_, fields)) = current.as_mut() else { continue };
        if line == "}" {
            let (name, fields) = current.take().expect("in a struct");
            structs.insert(name, fields);
            continue;
        }
        let line = line.trim();
        if let Some(text) = line.strip_prefix("///") {
            doc.push(text.trim().to_string());
        } else if line.starts_with("#[") {
            if let Some(at) = line.find("rename = \"") {
                let rest = &line[at + 10..];
                rename = Some(rest[..rest.find('"').expect("closing quote")].to_string());
            }
        } else if let Some(field) = line.strip_prefix("pub ") {
            let (name, rust_type) = field.split_once(':').expect("a field");
            let key = rename.take().unwrap_or_else(|| name.to_string());
            fields.push(Field { key, rust_type: rust_type.trim().trim_end_matches(',').to_string(), doc: doc.join(" ") });
            doc.clear();
        } else if line.is_empty() {
            doc.clear();
        }
    }
    structs
}

fn show(value: &toml::Value) -> String {
    match value {
        toml::Value::Table(t) if t.is_empty() => "(none)".to_string(),
        v => format!("`{v}`"),
    }
}

/// Renders the reference and lists what is wrong with the sources.
fn render(structs: &BTreeMap<String, Vec<Field>>, defaults: &toml::Table) -> (String, Vec<String>) {
    let mut out = String::from(
        "# Configuration reference\n\n\
         Generated from the doc comments of `src/config.rs` and the defaults in `config/default.toml`\n\
         by `tests/config_reference.rs` (`DCAM_BLESS=1 cargo test --test config_reference`); edit those,\n\
         not this file. Layers: `config/default.toml` < `--config FILE` < env `DCAM__SECTION__KEY`\n\
         (e.g. `DCAM__BATCH__MAX_BATCH=16`, lists comma-separated). Unknown keys are errors;\n\
         `dcam-stream config check FILE` prints the effective configuration with secrets masked.\n",
    );
    let mut problems = Vec::new();
    let mut sections = vec![(String::new(), "Settings".to_string(), defaults)];
    while let Some((path, name, table)) = sections.pop() {
        let Some(fields) = structs.get(&name) else {
            problems.push(format!("no struct {name} for [{path}]"));
            continue;
        };
        let mut nested = Vec::new();
        let mut rows = String::new();
        for f in fields {
            let key = if path.is_empty() { f.key.clone() } else { format!("{path}.{}", f.key) };
            if f.doc.is_empty() && name != "Settings" {
                problems.push(format!("{key} ({name}::{}) has no doc comment", f.key));
            }
            let Some(value) = table.get(&f.key) else {
                problems.push(format!("{key} has no default in config/default.toml"));
                continue;
            };
            if structs.contains_key(&f.rust_type) {
                match value {
                    toml::Value::Table(t) => nested.push((key, f.rust_type.clone(), t)),
                    _ => problems.push(format!("[{key}] is not a table in config/default.toml")),
                }
                continue;
            }
            rows.push_str(&format!("| `{}` | {} | {} |\n", f.key, show(value), f.doc.replace('|', "\\|")));
        }
        for key in table.keys() {
            if !fields.iter().any(|f| &f.key == key) {
                problems.push(format!("config/default.toml has {path}.{key}, which no field reads"));
            }
        }
        if !rows.is_empty() {
            let doc = structs_doc(&path);
            out.push_str(&format!("\n## `[{path}]`\n\n{doc}| key | default | meaning |\n|---|---|---|\n{rows}"));
        }
        // Depth first in source order: push in reverse.
        for n in nested.into_iter().rev() {
            sections.push(n);
        }
    }
    (out, problems)
}

/// The short line under a section's heading (what the section is for).
fn structs_doc(path: &str) -> &'static str {
    match path {
        "kafka" => "The consumer group and the connection every client (consumer, producers, tools) shares.\n\n",
        "kafka.extra" => "",
        "topics" => "Output and control topics.\n\n",
        "model" => "The model served and where others may be loaded from at runtime.\n\n",
        "engine" => "ONNX Runtime: provider, sessions and threads (0 = chosen from the cores and provider).\n\n",
        "batch" => "How decoded images are grouped for the engine.\n\n",
        "decode" => "Parsing and decoding inputs, with the limits that protect memory.\n\n",
        "pipeline" => "Back-pressure, stall detection and shutdown.\n\n",
        "heatmap" => "Which heatmaps are written and where.\n\n",
        "s3" => "The S3 client (heatmap stores, model sources, `s3://` image URIs).\n\n",
        "delivery" => "At-least-once or exactly-once publishing, and commits.\n\n",
        "telemetry" => "Logs, traces, and the HTTP port (metrics, probes, page, API) with its access control.\n\n",
        "inspect" => "The inspection page's in-memory buffer.\n\n",
        "control" => "The control-topic reader: who may change it (HMAC signing) and how long start-up waits for it.\n\n",
        _ => "",
    }
}

#[test]
fn the_configuration_reference_is_generated_from_the_types_and_current() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let source = std::fs::read_to_string(root.join("src/config.rs")).unwrap();
    let defaults: toml::Table = std::fs::read_to_string(root.join("config/default.toml")).unwrap().parse().unwrap();
    let structs = settings_structs(&source);
    assert!(structs.len() >= 13, "found only {:?}", structs.keys().collect::<Vec<_>>());
    let (text, problems) = render(&structs, &defaults);
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    let path = root.join("docs/CONFIG.md");
    if std::env::var_os("DCAM_BLESS").is_some() {
        std::fs::write(&path, &text).unwrap();
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(committed == text, "docs/CONFIG.md is stale: run DCAM_BLESS=1 cargo test --test config_reference");
}

#[test]
fn a_field_without_a_doc_comment_or_default_is_reported() {
    let source = "pub struct Settings {\n    pub a: ASettings,\n}\n\npub struct ASettings {\n    /// Documented.\n    pub x: u32,\n    pub y: u32,\n    #[serde(rename = \"z_ms\")]\n    pub z: Duration,\n}\n";
    let defaults: toml::Table = "[a]\nx = 1\ny = 2\nw = 3\n".parse().unwrap();
    let (_, problems) = render(&settings_structs(source), &defaults);
    assert_eq!(
        problems,
        vec![
            "a.y (ASettings::y) has no doc comment".to_string(),
            "a.z_ms (ASettings::z_ms) has no doc comment".to_string(),
            "a.z_ms has no default in config/default.toml".to_string(),
            "config/default.toml has a.w, which no field reads".to_string(),
        ]
    );
}
