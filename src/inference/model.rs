//! The model contract (docs/DESIGN.md §1): metadata, per-class calibration and score normalisation.
//! Pure code, so it is tested without ONNX Runtime.

use std::collections::BTreeMap;

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};

pub(crate) use crate::event::ThresholdSource;

pub(crate) const DEFAULT_CLASS: &str = "_default";

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub(crate) struct Calibration {
    pub threshold: f32,
    pub min: f32,
    pub max: f32,
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct ModelInfo {
    pub name: String,
    pub version: String,
    pub backbone: String,
    pub input_size: u32,
    pub classes: Vec<String>,
    pub calibration: BTreeMap<String, Calibration>,
    pub train_config: serde_json::Value,
    pub metrics: serde_json::Value,
}

/// The verdict on one raw score.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Judgement {
    pub score: f32,
    pub threshold: f32,
    pub threshold_source: ThresholdSource,
    pub is_anomaly: bool,
    pub calibration: Calibration,
}

/// Thresholds set at runtime, per model version and class (see `control`).
#[derive(Debug, Default)]
pub(crate) struct RuntimeThresholds(std::sync::RwLock<BTreeMap<(String, String), f32>>);

impl RuntimeThresholds {
    pub(crate) fn set(&self, model_version: &str, class: &str, threshold: Option<f32>) {
        let mut map = self.0.write().expect("thresholds");
        let key = (model_version.to_string(), class.to_string());
        match threshold {
            Some(t) => map.insert(key, t),
            None => map.remove(&key),
        };
    }

    pub(crate) fn get(&self, model_version: &str, class: &str) -> Option<f32> {
        self.0.read().expect("thresholds").get(&(model_version.to_string(), class.to_string())).copied()
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.0.read().expect("thresholds").len()
    }
}

impl ModelInfo {
    /// How score records name this model.
    pub(crate) fn model_ref(&self) -> crate::event::ModelRef {
        crate::event::ModelRef { name: self.name.clone(), version: self.version.clone() }
    }

    /// Reads and validates `dcam.*` metadata; `get` looks a key up in `metadata_props`.
    pub(crate) fn from_metadata(get: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let req = |key: &str| get(key).ok_or_else(|| anyhow!("model metadata is missing {key:?} (see docs/DESIGN.md §1)"));
        let format = req("dcam.format")?;
        if format.trim() != "1" {
            bail!("model metadata dcam.format = {format:?}; this operator reads format 1");
        }
        let input_size: u32 = req("dcam.input_size")?.trim().parse().context("dcam.input_size is not an integer")?;
        if !(16..=4096).contains(&input_size) {
            bail!("dcam.input_size = {input_size} is out of range 16..=4096");
        }
        let classes: Vec<String> = serde_json::from_str(&req("dcam.classes")?).context("dcam.classes is not a JSON list of strings")?;
        let calibration: BTreeMap<String, Calibration> =
            serde_json::from_str(&req("dcam.calibration")?).context("dcam.calibration is not a JSON map of {threshold, min, max}")?;
        if !calibration.contains_key(DEFAULT_CLASS) {
            bail!("dcam.calibration has no {DEFAULT_CLASS:?} entry");
        }
        for class in &classes {
            if !calibration.contains_key(class) {
                bail!("dcam.calibration has no entry for class {class:?}");
            }
        }
        for (class, c) in &calibration {
            if !(c.threshold.is_finite() && c.min.is_finite() && c.max.is_finite() && c.max > c.min) {
                bail!("dcam.calibration[{class:?}] needs finite values with max > min, got {c:?}");
            }
        }
        let json_or_null = |key: &str| get(key).and_then(|v| serde_json::from_str(&v).ok()).unwrap_or(serde_json::Value::Null);
        Ok(Self {
            name: get("dcam.model_name").unwrap_or_else(|| "dcam".into()),
            version: get("dcam.version").unwrap_or_else(|| "unknown".into()),
            backbone: get("dcam.backbone").unwrap_or_default(),
            input_size,
            classes,
            calibration,
            train_config: json_or_null("dcam.train_config"),
            metrics: json_or_null("dcam.metrics"),
        })
    }
}

/// Turns raw scores into normalised scores and verdicts, with config overrides of thresholds.
#[derive(Debug, Clone)]
pub(crate) struct Scorer {
    calibration: BTreeMap<String, Calibration>,
    /// Classes whose threshold comes from `model.thresholds`.
    configured: std::collections::BTreeSet<String>,
}

impl Scorer {
    pub(crate) fn new(info: &ModelInfo, threshold_overrides: &BTreeMap<String, f32>) -> Result<Self> {
        let mut calibration = info.calibration.clone();
        for (class, t) in threshold_overrides {
            let base = *calibration.get(class).or_else(|| calibration.get(DEFAULT_CLASS)).expect("validated");
            calibration.insert(class.clone(), Calibration { threshold: *t, ..base });
        }
        Ok(Self { calibration, configured: threshold_overrides.keys().cloned().collect() })
    }

    /// Like `judge`, with a runtime threshold for the class winning over the configured one.
    pub(crate) fn judge_with(&self, class: Option<&str>, raw: f32, runtime: Option<f32>) -> Judgement {
        let (c, threshold_source) = self.calibration_in_force(class, runtime);
        Judgement { score: normalise(raw, &c), threshold: c.threshold, threshold_source, is_anomaly: raw >= c.threshold, calibration: c }
    }

    /// The calibration `class` is judged by, with its threshold from where it comes: runtime >
    /// configuration > the model.
    pub(crate) fn calibration_in_force(&self, class: Option<&str>, runtime: Option<f32>) -> (Calibration, ThresholdSource) {
        let c = self.calibration_for(class);
        match runtime {
            Some(threshold) => (Calibration { threshold, ..c }, ThresholdSource::Runtime),
            None if self.configured.contains(self.class_key(class)) => (c, ThresholdSource::Config),
            None => (c, ThresholdSource::Model),
        }
    }

    /// The calibration entry `class` is judged by: its own, or `_default` for an unknown class.
    pub(crate) fn class_key<'a>(&self, class: Option<&'a str>) -> &'a str {
        class.filter(|k| self.calibration.contains_key(*k)).unwrap_or(DEFAULT_CLASS)
    }

    pub(crate) fn calibration_for(&self, class: Option<&str>) -> Calibration {
        class.and_then(|c| self.calibration.get(c)).or_else(|| self.calibration.get(DEFAULT_CLASS)).copied().expect("validated")
    }

    pub(crate) fn judge(&self, class: Option<&str>, raw: f32) -> Judgement {
        self.judge_with(class, raw, None)
    }
}

/// docs/DESIGN.md §1: `clamp((raw − threshold) / (max − min) + 0.5, 0, 1)`.
pub(crate) fn normalise(raw: f32, c: &Calibration) -> f32 {
    let span = (c.max - c.min).max(f32::EPSILON);
    let v = (raw - c.threshold) / span + 0.5;
    if v.is_nan() {
        1.0
    } else {
        v.clamp(0.0, 1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(extra: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let mut m: BTreeMap<String, String> = [
            ("dcam.format", "1"),
            ("dcam.input_size", "64"),
            ("dcam.classes", r#"["bottle","tile"]"#),
            (
                "dcam.calibration",
                r#"{"bottle":{"threshold":0.5,"min":0.1,"max":0.9},"tile":{"threshold":2,"min":1,"max":3},"_default":{"threshold":1,"min":0,"max":2}}"#,
            ),
            ("dcam.version", "7"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        for (k, v) in extra {
            if v.is_empty() {
                m.remove(*k);
            } else {
                m.insert(k.to_string(), v.to_string());
            }
        }
        move |k| m.get(k).cloned()
    }

    #[test]
    fn reads_valid_metadata() {
        let info = ModelInfo::from_metadata(meta(&[])).unwrap();
        assert_eq!(info.input_size, 64);
        assert_eq!(info.classes, vec!["bottle", "tile"]);
        assert_eq!(info.version, "7");
    }

    #[test]
    fn invalid_metadata_names_the_problem() {
        for (extra, needle) in [
            (vec![("dcam.format", "")], "dcam.format"),
            (vec![("dcam.format", "2")], "format 1"),
            (vec![("dcam.input_size", "abc")], "dcam.input_size"),
            (vec![("dcam.classes", "bottle")], "dcam.classes"),
            (vec![("dcam.calibration", r#"{"bottle":{"threshold":1,"min":0,"max":2}}"#)], "_default"),
            (vec![("dcam.calibration", r#"{"_default":{"threshold":1,"min":0,"max":2}}"#)], "bottle"),
            (
                vec![(
                    "dcam.calibration",
                    r#"{"bottle":{"threshold":1,"min":2,"max":2},"tile":{"threshold":1,"min":0,"max":2},"_default":{"threshold":1,"min":0,"max":2}}"#,
                )],
                "max > min",
            ),
        ] {
            let err = format!("{:#}", ModelInfo::from_metadata(meta(&extra)).unwrap_err());
            assert!(err.contains(needle), "{needle}: {err}");
        }
    }

    #[test]
    fn normalisation_follows_the_contract() {
        let c = Calibration { threshold: 0.5, min: 0.1, max: 0.9 };
        assert!((normalise(0.5, &c) - 0.5).abs() < 1e-6);
        assert!((normalise(0.7, &c) - 0.75).abs() < 1e-6);
        assert_eq!(normalise(100.0, &c), 1.0);
        assert_eq!(normalise(-100.0, &c), 0.0);
    }

    #[test]
    fn unknown_class_uses_default_and_overrides_win() {
        let info = ModelInfo::from_metadata(meta(&[])).unwrap();
        let s = Scorer::new(&info, &BTreeMap::from([("bottle".to_string(), 0.8f32)])).unwrap();
        let j = s.judge(Some("bottle"), 0.6);
        assert_eq!(j.threshold, 0.8);
        assert!(!j.is_anomaly);
        let j = s.judge(Some("screw"), 1.0);
        assert_eq!(j.threshold, 1.0);
        assert!(j.is_anomaly, "raw == threshold is anomalous");
        assert_eq!(s.judge(None, 0.0).threshold, 1.0);
        assert_eq!(s.judge(Some("bottle"), 0.0).threshold_source, ThresholdSource::Config);
        assert_eq!(s.judge(Some("screw"), 0.0).threshold_source, ThresholdSource::Model);
    }

    #[test]
    fn runtime_thresholds_win_and_belong_to_a_model_version() {
        let info = ModelInfo::from_metadata(meta(&[])).unwrap();
        let s = Scorer::new(&info, &BTreeMap::from([("bottle".to_string(), 0.8f32)])).unwrap();
        let runtime = RuntimeThresholds::default();
        runtime.set("1.0", "bottle", Some(0.5));
        let j = s.judge_with(Some("bottle"), 0.6, runtime.get("1.0", "bottle"));
        assert_eq!((j.threshold, j.threshold_source, j.is_anomaly), (0.5, ThresholdSource::Runtime, true));
        assert_eq!(
            j.score,
            normalise(0.6, &Calibration { threshold: 0.5, ..s.calibration_for(Some("bottle")) }),
            "the score is normalised around the threshold used"
        );
        assert_eq!(runtime.get("2.0", "bottle"), None, "another model version starts from its own calibration");
        runtime.set("1.0", "bottle", None);
        assert_eq!(s.judge_with(Some("bottle"), 0.6, runtime.get("1.0", "bottle")).threshold_source, ThresholdSource::Config);
    }
}
