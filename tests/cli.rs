//! The one-shot commands, run as a user would: `score`, `replay --dir`, `demo`, `model inspect`,
//! `config check`. Real model, real images; no broker needed.

mod common;

use std::process::Command;

use common::*;

fn dcam(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_dcam-stream")).args(args).env("DCAM__MODEL__PATH", model_path()).current_dir(repo_root()).output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn score_prints_one_json_line_per_file_in_order_with_heatmaps() {
    let tmp = tempfile::tempdir().unwrap();
    let files = sample_images(2);
    let mut args: Vec<String> = vec!["score".into(), "--heatmaps".into(), tmp.path().display().to_string()];
    args.extend(files.iter().map(|f| f.path.display().to_string()));
    let junk = tmp.path().join("junk.png");
    std::fs::write(&junk, b"not an image").unwrap();
    args.push(junk.display().to_string());
    let out = Command::new(env!("CARGO_BIN_EXE_dcam-stream"))
        .args(&args)
        .env("DCAM__MODEL__PATH", model_path())
        .env("DCAM__HEATMAP__POLICY", "all")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let lines: Vec<serde_json::Value> = text(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), files.len() + 1);
    for (line, f) in lines.iter().zip(&files) {
        assert_eq!(line["path"], f.path.display().to_string(), "file order kept");
        let score = line["score"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&score));
        assert!(std::path::Path::new(line["heatmap"].as_str().unwrap()).exists());
    }
    let last = lines.last().unwrap();
    assert_eq!(last["error_kind"], "unsupported_format", "a bad file is reported, not dropped");
}

/// A model can output NaN: that image has no score to publish (JSON has no NaN; the schema says
/// number), so it is reported as a `model_output` failure and every other image is scored.
#[test]
fn a_nan_score_is_a_model_output_failure_not_a_score() {
    let tmp = tempfile::tempdir().unwrap();
    let model = nan_on_black_model(tmp.path());
    let black = tmp.path().join("black.png");
    image::RgbImage::new(64, 64).save(&black).unwrap();
    let good = &sample_images(1)[0].path;
    let out = dcam(&["score", "--model", &model.display().to_string(), &black.display().to_string(), &good.display().to_string()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let lines: Vec<serde_json::Value> = text(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2, "{}", text(&out.stdout));
    let nan = &lines[0];
    assert_eq!(nan["error_kind"], "model_output", "{nan}");
    assert!(nan["error"].as_str().unwrap().contains("NaN"), "the error says what the model returned: {nan}");
    assert!(nan["score"].is_null() && nan["raw_score"].is_null() && nan["is_anomaly"].is_null(), "no verdict without a score: {nan}");
    assert!(lines[1]["raw_score"].as_f64().unwrap().is_finite() && lines[1]["error"].is_null(), "the other image is scored: {}", lines[1]);
}

#[test]
fn replay_dir_scores_a_dataset_in_file_order_and_summarises() {
    let tmp = tempfile::tempdir().unwrap();
    // A small MVTec-layout dataset made of real images.
    let files = sample_images(3);
    for f in &files {
        let dest = tmp.path().join("data").join(f.class.as_deref().unwrap()).join("test").join(f.label.as_deref().unwrap()).join(f.path.file_name().unwrap());
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        std::fs::copy(&f.path, dest).unwrap();
    }
    let output = tmp.path().join("out.jsonl");
    let out = dcam(&["replay", "--dir", &tmp.path().join("data").display().to_string(), "--output", &output.display().to_string()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&output).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), files.len());
    let ids: Vec<&str> = lines.iter().map(|l| l["image_id"].as_str().unwrap()).collect();
    let mut sorted = ids.clone();
    sorted.sort();
    assert_eq!(ids, sorted, "file order");
    let anomalies = lines.iter().filter(|l| l["is_anomaly"] == true).count();
    assert!(
        text(&out.stderr).contains(&format!("replayed {} records ({} scored, {anomalies} anomalies, 0 dead letters)", files.len(), files.len())),
        "{}",
        text(&out.stderr)
    );
    // With the lines in --output, stdout is the summary record (schemas/replay-summary.json).
    let summary: serde_json::Value =
        serde_json::from_str(text(&out.stdout).trim()).unwrap_or_else(|e| panic!("stdout is not one JSON summary ({e}): {}", text(&out.stdout)));
    let n = files.len() as u64;
    assert_eq!(
        (&summary["records"], &summary["scored"], &summary["anomalies"], &summary["dead_letters"], &summary["ranges"]),
        (&n.into(), &n.into(), &(anomalies as u64).into(), &0.into(), &serde_json::json!({})),
        "{summary}"
    );
    assert!(summary["duration_s"].as_f64().is_some_and(|d| d > 0.0), "{summary}");
}

/// The README's first command, with its defaults: 24 images per class, half of them ~0.5 MB
/// bottle PNGs. librdkafka's MockCluster trims the oldest records past ~5 MB per partition, so
/// without flow control some were gone before the operator read them.
#[test]
fn demo_runs_end_to_end_on_the_embedded_broker() {
    let out = dcam(&["demo", "--dataset", &datasets().display().to_string(), "--quiet"]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("images scored     48"), "{stdout}");
    assert!(stdout.contains("agree with labels"), "{stdout}");
    assert!(!stderr.contains("ERROR"), "a normal demo logs no errors:\n{stderr}");
}

/// Files named on the command line keep distinct ids (and heatmaps) even with the same file
/// name, and take their class from an MVTec-style path, or from --class.
#[test]
fn score_gives_each_file_its_own_id_and_the_class_its_path_names() {
    let tmp = tempfile::tempdir().unwrap();
    let data = datasets();
    let bottle = data.join("bottle/test/broken_large/000.png");
    let tile = data.join("magnetic_tile/test/crack").read_dir().unwrap().map(|e| e.unwrap().path()).min().unwrap();
    let copy = tmp.path().join("cam/000.png");
    std::fs::create_dir_all(copy.parent().unwrap()).unwrap();
    std::fs::copy(&bottle, &copy).unwrap();
    let heat = tmp.path().join("heat");
    let args = ["score", "--heatmaps", &heat.display().to_string(), &bottle.display().to_string(), &tile.display().to_string(), &copy.display().to_string()];
    let out =
        Command::new(env!("CARGO_BIN_EXE_dcam-stream")).args(args).env("DCAM__MODEL__PATH", model_path()).env("DCAM__HEATMAP__POLICY", "all").output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let lines: Vec<serde_json::Value> = text(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let ids: std::collections::HashSet<&str> = lines.iter().map(|l| l["image_id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), 3, "{lines:?}");
    assert_eq!(lines[0]["class"], "bottle");
    assert_eq!(lines[1]["class"], "magnetic_tile");
    assert_eq!(std::fs::read_dir(&heat).unwrap().count(), 3, "one heatmap per file, none overwritten");
    let out = dcam(&["score", "--class", "bottle", &copy.display().to_string()]);
    let line: serde_json::Value = serde_json::from_str(text(&out.stdout).lines().next().unwrap()).unwrap();
    assert_eq!(line["class"], "bottle");
}

#[test]
fn model_inspect_and_config_check() {
    let out = dcam(&["model", "inspect", &model_path().display().to_string()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(info["classes"], serde_json::json!(["bottle", "magnetic_tile"]));
    assert!(info["calibration"]["_default"]["threshold"].is_number());

    let tmp = tempfile::tempdir().unwrap();
    let good = tmp.path().join("good.toml");
    std::fs::write(&good, "[batch]\nmax_batch = 4\n[kafka]\nsasl_password = \"hunter2\"\n[kafka.extra]\n\"sasl.oauthbearer.client.secret\" = \"hunter3\"\n[telemetry]\notlp_endpoint = \"http://u:hunter4@otel:4317\"\n").unwrap();
    let out = dcam(&["config", "check", &good.display().to_string()]);
    assert!(out.status.success());
    let shown = text(&out.stdout);
    assert!(shown.contains("max_batch = 4") && !shown.contains("hunter"), "{shown}");
    let bad = tmp.path().join("bad.toml");
    std::fs::write(&bad, "[batch]\nmax_batch = -3\n").unwrap();
    let out = dcam(&["config", "check", &bad.display().to_string()]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("max_batch"), "{}", text(&out.stderr));

    let missing = dcam(&["model", "inspect", "/nonexistent.onnx"]);
    assert!(!missing.status.success());
    assert!(text(&missing.stderr).contains("does not exist"));
}

#[test]
fn a_model_with_a_fixed_batch_dimension_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let fixed = fixed_batch_model(tmp.path(), 4);
    let out = dcam(&["model", "inspect", &fixed.display().to_string()]);
    assert!(!out.status.success(), "a model fixed to batches of 4 was loaded: {}", text(&out.stdout));
    let err = text(&out.stderr);
    assert!(err.contains("fixed batch dimension of 4"), "the refusal names the dimension: {err}");
}

/// A camera-size JPEG must get the verdict its own pixels get. Each bottle image is re-encoded as a
/// 2048² JPEG (q90) and, decoded at full scale, saved again as a PNG: the operator's reduced-scale
/// JPEG path must score the JPEG as the PNG scores. (With the IDCT at 1/8 straight to the model's
/// 256 px, every good frame was flagged: raw scores 10-15 against a threshold of 7.15.)
#[test]
fn a_camera_size_jpeg_gets_the_verdict_of_its_full_decode() {
    let tmp = tempfile::tempdir().unwrap();
    let data = datasets();
    let sources = ["good/000.png", "good/005.png", "good/011.png", "broken_small/000.png", "contamination/003.png"];
    let mut args = vec!["score".to_string(), "--class".into(), "bottle".into()];
    for (i, name) in sources.iter().enumerate() {
        let img = image::open(data.join("bottle/test").join(name)).unwrap().to_rgb8();
        let frame = image::imageops::resize(&img, 2048, 2048, image::imageops::FilterType::CatmullRom);
        let jpeg = tmp.path().join(format!("{i}.jpg"));
        let mut bytes = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut bytes, 90).encode_image(&frame).unwrap();
        std::fs::write(&jpeg, &bytes).unwrap();
        let png = tmp.path().join(format!("{i}.png"));
        image::load_from_memory(&bytes).unwrap().save(&png).unwrap();
        args.extend([jpeg.display().to_string(), png.display().to_string()]);
    }
    let out = dcam(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(out.status.success(), "{}", text(&out.stderr));
    let lines: Vec<serde_json::Value> = text(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2 * sources.len());
    for (pair, name) in lines.chunks(2).zip(sources) {
        let (jpeg, png) = (&pair[0], &pair[1]);
        let (a, b) = (jpeg["raw_score"].as_f64().unwrap(), png["raw_score"].as_f64().unwrap());
        assert!((a - b).abs() < 1.0, "{name}: raw score {a:.2} as a 2048² JPEG, {b:.2} decoded at full scale");
        assert_eq!(jpeg["is_anomaly"], png["is_anomaly"], "{name}: {jpeg} vs {png}");
        assert_eq!(png["is_anomaly"], !name.starts_with("good"), "{name}: the model's own verdict on it: {png}");
    }
}
