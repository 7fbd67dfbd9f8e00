//! Scoring files without Kafka: `score` and `replay --dir`. Same decode → batch → engine
//! stages as the operator; results come back in file order.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Result;

use crate::config::Settings;
use crate::dataset::ImageFile;
use crate::delivery::Ticket;
use crate::inference::active::ModelSlot;
use crate::inference::engine::Engine;
use crate::inference::heatmap;
use crate::stream::pipeline::{Job, Outcome, Pipeline};
use crate::telemetry::Metrics;

/// One line of `score` output.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(crate) struct FileScore {
    pub path: String,
    pub image_id: String,
    pub class: Option<String>,
    pub label: Option<String>,
    pub score: Option<f32>,
    pub raw_score: Option<f32>,
    pub threshold: Option<f32>,
    pub is_anomaly: Option<bool>,
    pub heatmap: Option<String>,
    pub error: Option<String>,
    pub error_kind: Option<String>,
}

/// Scores `files` in order; `on_result` sees each result in file order as soon as it and all
/// before it are done. Heatmaps (per `settings.heatmap.policy`) go under `heatmap_dir`.
pub(crate) fn score_files(
    settings: &Settings,
    engine: Arc<Engine>,
    files: &[ImageFile],
    heatmap_dir: Option<&Path>,
    mut on_result: impl FnMut(&FileScore),
) -> Result<Vec<FileScore>> {
    let models = Arc::new(ModelSlot::configured(engine, settings)?);
    let (tx, rx) = crossbeam_channel::unbounded::<Outcome>();
    let pipeline = Pipeline::start(models, &settings.decode, &settings.s3, &settings.batch, Metrics::new(), Arc::new(tx));
    let submit = pipeline.submitter();
    let feeder_files: Vec<ImageFile> = files.to_vec();
    let feeder = std::thread::spawn(move || {
        for (i, f) in feeder_files.iter().enumerate() {
            // A read error becomes an empty payload, so it comes back as a rejection in order.
            let bytes = std::fs::read(&f.path).unwrap_or_default();
            // The raw event form: the file's bytes as they are, id and class in headers.
            let headers = crate::event::raw_event_headers(&f.image_id, f.class.as_deref());
            let job = Job {
                ticket: Ticket { topic: "file".into(), partition: 0, offset: i as i64, generation: 0 },
                key: None,
                value: Some(bytes),
                headers,
                timestamp: None,
                consumed_at: Instant::now(),
            };
            if submit.send(job).is_err() {
                return;
            }
        }
    });
    let mut slots: Vec<Option<FileScore>> = vec![None; files.len()];
    let mut next = 0;
    for outcome in rx.iter().take(files.len()) {
        let i = outcome.job().ticket.offset as usize;
        let f = &files[i];
        let mut result = FileScore {
            path: f.path.display().to_string(),
            image_id: f.image_id.clone(),
            class: f.class.clone(),
            label: f.label.clone(),
            score: None,
            raw_score: None,
            threshold: None,
            is_anomaly: None,
            heatmap: None,
            error: None,
            error_kind: None,
        };
        match outcome {
            Outcome::Scored(s) => {
                let v = s.model.scorer.judge(f.class.as_deref(), s.raw_score);
                let wanted = settings.heatmap.policy.wants(v.is_anomaly);
                if let (true, Some(dir)) = (wanted, heatmap_dir) {
                    let path = dir.join(format!("{}.png", f.image_id));
                    let png = heatmap::render_png(&s.map, s.input.size, &v.calibration, settings.heatmap.overlay.then_some(s.input.rgb.as_slice()));
                    std::fs::create_dir_all(dir)?;
                    std::fs::write(&path, png)?;
                    result.heatmap = Some(path.display().to_string());
                }
                result.score = Some(v.score);
                result.raw_score = Some(s.raw_score);
                result.threshold = Some(v.threshold);
                result.is_anomaly = Some(v.is_anomaly);
            }
            Outcome::Rejected { rejection, .. } => {
                result.error = Some(rejection.message);
                result.error_kind = Some(rejection.kind.as_str().to_string());
            }
        }
        slots[i] = Some(result);
        while next < slots.len() && slots[next].is_some() {
            on_result(slots[next].as_ref().expect("present"));
            next += 1;
        }
    }
    let _ = feeder.join();
    pipeline.finish();
    Ok(slots.into_iter().flatten().collect())
}
