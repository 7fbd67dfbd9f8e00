//! What the inspection page (`/ui`) shows, kept in memory and bounded: the latest scored images
//! with heatmap thumbnails (so the page works with `heatmap.policy = none`), recent raw scores
//! per class with their labels, and recent end-to-end latencies.
//!
//! An image's id names it across processes: a random per-process prefix and a counter, so two
//! replicas behind one Ingress, or one operator before and after a restart, never give two
//! images the same id (nor the same thumbnail URL).
//!
//! Thumbnails cost a render per image, so normal images get one only while someone is watching
//! (the page's API was read in the last few minutes); anomalies always do.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::event::ScoreRecord;
use crate::telemetry::{CLASS_NONE, CLASS_OTHER};

/// How long after the last page or API request normal images still get thumbnails.
const WATCH_WINDOW: Duration = Duration::from_secs(300);
/// Recent raw scores kept per class for the histograms.
const SCORES_PER_CLASS: usize = 2000;
/// Latencies kept for the live percentiles.
const LATENCY_WINDOW: Duration = Duration::from_secs(60);
/// Latencies waiting for the live panel's task; beyond this (nobody takes them) new ones are dropped.
const PENDING_LATENCIES: usize = 1 << 16;

/// One scored image as the page lists it.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct RecentItem {
    pub id: String,
    pub has_thumbnail: bool,
    pub record: ScoreRecord,
}

struct Entry {
    item: RecentItem,
    thumbnail: Option<Vec<u8>>,
    bytes: usize,
}

/// One class's recent raw scores; `normal` is the label from `attributes.label`, if any.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct ClassScores {
    pub raw: VecDeque<f32>,
    pub normal: VecDeque<Option<bool>>,
}

#[derive(Default)]
struct Inner {
    entries: VecDeque<Entry>,
    bytes: usize,
    next_id: u64,
    scores: BTreeMap<String, ClassScores>,
}

pub(crate) struct Recent {
    max_bytes: usize,
    thumbnail_px: u32,
    inner: Mutex<Inner>,
    /// Random per process: ids stay unique across replicas and restarts.
    id_prefix: String,
    /// End-to-end latencies since the live panel last took them: the sink only appends here,
    /// under a lock of their own that is held for a push or a swap.
    latencies: Mutex<Vec<(Instant, f64)>>,
    started: Instant,
    /// Milliseconds since `started` of the last request from the page (0 = never).
    watched_at: AtomicU64,
}

impl Recent {
    /// `max_bytes` bounds records and thumbnails together; 0 turns the ring buffer off.
    pub(crate) fn new(max_bytes: usize, thumbnail_px: u32) -> Self {
        Self {
            max_bytes,
            thumbnail_px,
            inner: Mutex::default(),
            id_prefix: format!("{:016x}", rand::random::<u64>()),
            latencies: Mutex::default(),
            started: Instant::now(),
            watched_at: AtomicU64::new(0),
        }
    }

    pub(crate) fn thumbnail_px(&self) -> u32 {
        self.thumbnail_px
    }

    /// Called by the page's endpoints: someone is looking.
    pub(crate) fn watched(&self) {
        self.watched_at.store(self.started.elapsed().as_millis() as u64 + 1, Ordering::Relaxed);
    }

    /// Whether an image should get a thumbnail.
    pub(crate) fn wants_thumbnail(&self, anomaly: bool) -> bool {
        if self.max_bytes == 0 || self.thumbnail_px == 0 {
            return false;
        }
        let at = self.watched_at.load(Ordering::Relaxed);
        anomaly || (at > 0 && (self.started.elapsed().as_millis() as u64).saturating_sub(at) < WATCH_WINDOW.as_millis() as u64)
    }

    /// Adds a scored image; the oldest ones go when the byte bound is reached. `classes` are the
    /// classes of the model that scored it.
    pub(crate) fn push(&self, record: &ScoreRecord, thumbnail: Option<Vec<u8>>, classes: &[String]) {
        {
            let mut pending = self.latencies.lock().expect("latencies");
            if pending.len() < PENDING_LATENCIES {
                pending.push((Instant::now(), record.latency_ms.total));
            }
        }
        let mut inner = self.inner.lock().expect("recent");
        let scores = inner.scores.entry(score_key(record.class.as_deref(), classes)).or_default();
        scores.raw.push_back(record.raw_score);
        scores.normal.push_back(normal_label(&record.attributes));
        if scores.raw.len() > SCORES_PER_CLASS {
            scores.raw.pop_front();
            scores.normal.pop_front();
        }
        if self.max_bytes == 0 {
            return;
        }
        let id = format!("{}-{}", self.id_prefix, inner.next_id);
        inner.next_id += 1;
        let bytes = thumbnail.as_ref().map_or(0, Vec::len) + record_size(record);
        inner.bytes += bytes;
        inner.entries.push_back(Entry { item: RecentItem { id, has_thumbnail: thumbnail.is_some(), record: record.clone() }, thumbnail, bytes });
        while inner.bytes > self.max_bytes {
            let Some(old) = inner.entries.pop_front() else { break };
            inner.bytes -= old.bytes;
        }
    }

    /// The newest images first, optionally one class or anomalies only.
    pub(crate) fn list(&self, class: Option<&str>, anomalies_only: bool, limit: usize) -> Vec<RecentItem> {
        let inner = self.inner.lock().expect("recent");
        inner
            .entries
            .iter()
            .rev()
            .filter(|e| class.is_none_or(|c| e.item.record.class.as_deref() == Some(c)))
            .filter(|e| !anomalies_only || e.item.record.is_anomaly)
            .take(limit)
            .map(|e| e.item.clone())
            .collect()
    }

    pub(crate) fn thumbnail(&self, id: &str) -> Option<Vec<u8>> {
        let inner = self.inner.lock().expect("recent");
        inner.entries.iter().find(|e| e.item.id == id).and_then(|e| e.thumbnail.clone())
    }

    pub(crate) fn scores(&self) -> BTreeMap<String, ClassScores> {
        self.inner.lock().expect("recent").scores.clone()
    }

    /// The latencies recorded since the last call (a swap under their lock, nothing more).
    pub(crate) fn take_latencies(&self) -> Vec<(Instant, f64)> {
        std::mem::take(&mut *self.latencies.lock().expect("latencies"))
    }

    /// Bytes held now (records and thumbnails).
    #[cfg(test)]
    fn bytes(&self) -> usize {
        self.inner.lock().expect("recent").bytes
    }
}

/// The last minute of end-to-end latencies, owned by the one task that reports them: copying
/// and sorting happen here, never under a lock the sink takes.
#[derive(Default)]
pub(crate) struct LatencyWindow(VecDeque<(Instant, f64)>);

impl LatencyWindow {
    /// Adds the latest samples (from `Recent::take_latencies`) and forgets those over a minute old.
    pub(crate) fn absorb(&mut self, samples: Vec<(Instant, f64)>, now: Instant) {
        self.0.extend(samples);
        while self.0.front().is_some_and(|(t, _)| now.duration_since(*t) > LATENCY_WINDOW) {
            self.0.pop_front();
        }
    }

    /// (p50, p99) in ms.
    pub(crate) fn percentiles(&self) -> Option<(f64, f64)> {
        let mut ms: Vec<f64> = self.0.iter().map(|(_, l)| *l).collect();
        if ms.is_empty() {
            return None;
        }
        ms.sort_by(f64::total_cmp);
        Some((percentile(&ms, 0.5), percentile(&ms, 0.99)))
    }
}

/// The nearest-rank `q` quantile of sorted values (NaN when there are none).
pub(crate) fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

/// Where a record's score is kept: under its class when the model knows it, else under one
/// shared `_other`, so input strings never grow the map (as with metric labels).
fn score_key(class: Option<&str>, classes: &[String]) -> String {
    match class {
        None => CLASS_NONE.into(),
        Some(c) if classes.iter().any(|k| k == c) => c.into(),
        Some(_) => CLASS_OTHER.into(),
    }
}

fn record_size(record: &ScoreRecord) -> usize {
    // Strings dominate; the attributes are counted by their JSON size.
    512 + record.image_id.len() + record.heatmap_uri.as_ref().map_or(0, String::len) + record.attributes.to_string().len()
}

/// `attributes.label` of a camera event, when it says whether the part was good:
/// `good` / `normal` / `ok` → normal; any other string → not normal; absent → unknown.
fn normal_label(attributes: &serde_json::Value) -> Option<bool> {
    let label = attributes.get("label")?.as_str()?.to_ascii_lowercase();
    Some(matches!(label.as_str(), "good" | "normal" | "ok"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Latency, ModelRef, SourceRef};

    fn record(id: &str, class: &str, raw: f32, anomaly: bool, label: Option<&str>) -> ScoreRecord {
        ScoreRecord {
            schema_version: crate::event::SCORE_SCHEMA_VERSION,
            image_id: id.into(),
            class: Some(class.into()),
            score: 0.5,
            raw_score: raw,
            threshold: 1.0,
            threshold_source: crate::inference::model::ThresholdSource::Model,
            is_anomaly: anomaly,
            heatmap_uri: None,
            model: ModelRef { name: "m".into(), version: "1".into() },
            source: SourceRef { topic: "t".into(), partition: 0, offset: 0, timestamp: None },
            scored_at: String::new(),
            latency_ms: Latency { queue: 0.0, inference: 1.0, total: 10.0 },
            attributes: label.map_or(serde_json::json!({}), |l| serde_json::json!({"label": l})),
        }
    }

    fn model_classes() -> Vec<String> {
        vec!["bottle".into(), "tile".into()]
    }

    #[test]
    fn the_ring_buffer_stays_under_its_byte_bound_and_lists_newest_first() {
        let recent = Recent::new(10_000, 64);
        for i in 0..100 {
            let class = if i % 2 == 0 { "bottle" } else { "tile" };
            recent.push(&record(&format!("img-{i}"), class, i as f32, i % 10 == 0, Some("good")), Some(vec![0u8; 500]), &model_classes());
        }
        assert!(recent.bytes() <= 10_000, "{} bytes", recent.bytes());
        let newest = recent.list(None, false, 3);
        assert_eq!(newest.iter().map(|i| i.record.image_id.as_str()).collect::<Vec<_>>(), ["img-99", "img-98", "img-97"]);
        assert!(recent.list(Some("bottle"), false, 100).iter().all(|i| i.record.class.as_deref() == Some("bottle")));
        assert!(recent.list(None, true, 100).iter().all(|i| i.record.is_anomaly));
        assert!(recent.thumbnail(&newest[0].id).is_some() && recent.thumbnail(&format!("{}-0", recent.id_prefix)).is_none(), "the oldest thumbnails are gone");
        // The score history is kept beyond the thumbnails, with labels.
        assert_eq!(recent.scores()["bottle"].raw.len(), 50);
        assert_eq!(recent.scores()["tile"].normal[0], Some(true));
    }

    #[test]
    fn classes_the_model_does_not_know_share_one_entry() {
        let recent = Recent::new(1 << 20, 64);
        recent.push(&record("known-1", "bottle", 1.0, false, None), None, &model_classes());
        recent.push(&record("known-2", "tile", 2.0, false, None), None, &model_classes());
        for i in 0..10_000 {
            recent.push(&record(&format!("img-{i}"), &format!("unknown-{i}"), 3.0, false, None), None, &model_classes());
        }
        let scores = recent.scores();
        assert_eq!(scores.keys().collect::<Vec<_>>(), ["_other", "bottle", "tile"], "the model's classes and one _other");
        assert_eq!(scores["_other"].raw.len(), SCORES_PER_CLASS, "unknown classes are counted, within the per-class bound");
        assert_eq!((scores["bottle"].raw.len(), scores["tile"].raw.len()), (1, 1));
        // The record itself keeps the class it came with; only the score map is keyed by the model.
        assert_eq!(recent.list(None, false, 1)[0].record.class.as_deref(), Some("unknown-9999"));
    }

    #[test]
    fn normal_images_get_thumbnails_only_while_watched() {
        let recent = Recent::new(1 << 20, 64);
        assert!(recent.wants_thumbnail(true) && !recent.wants_thumbnail(false));
        recent.watched();
        assert!(recent.wants_thumbnail(false));
        assert!(!Recent::new(0, 64).wants_thumbnail(true), "off when the buffer is off");
        assert_eq!(normal_label(&serde_json::json!({"label": "crack"})), Some(false));
        assert_eq!(normal_label(&serde_json::json!({})), None);
    }

    #[test]
    fn ids_from_two_instances_never_collide() {
        // Each process has one `Recent`: two of them stand for two replicas, or a restart.
        let (a, b) = (Recent::new(1 << 20, 64), Recent::new(1 << 20, 64));
        for recent in [&a, &b] {
            for i in 0..5 {
                recent.push(&record(&format!("img-{i}"), "bottle", 1.0, false, None), Some(vec![1]), &model_classes());
            }
        }
        let ids = |r: &Recent| r.list(None, false, 10).into_iter().map(|i| i.id).collect::<Vec<_>>();
        let (ids_a, ids_b) = (ids(&a), ids(&b));
        assert_eq!(ids_a.len(), 5);
        assert!(ids_a.iter().all(|id| !ids_b.contains(id)), "{ids_a:?} vs {ids_b:?}");
        assert!(b.thumbnail(&ids_a[0]).is_none(), "one instance's id finds nothing in the other");
    }

    #[test]
    fn the_sink_only_appends_latencies_and_the_window_keeps_a_minute() {
        let recent = Recent::new(0, 0);
        for ms in [30.0, 10.0, 20.0] {
            let mut r = record("x", "bottle", 1.0, false, None);
            r.latency_ms.total = ms;
            recent.push(&r, None, &model_classes());
        }
        let taken = recent.take_latencies();
        assert_eq!(taken.iter().map(|(_, ms)| *ms).collect::<Vec<_>>(), [30.0, 10.0, 20.0], "raw, unsorted: sorting is the reader's job");
        assert!(recent.take_latencies().is_empty(), "taken once");
        let mut window = LatencyWindow::default();
        let now = Instant::now();
        window.absorb(taken, now);
        assert_eq!(window.percentiles(), Some((20.0, 30.0)));
        window.absorb(Vec::new(), now + LATENCY_WINDOW + Duration::from_secs(1));
        assert_eq!(window.percentiles(), None, "older than a minute");
    }
}
