//! From image bytes to a score: decoding (`decode`), the ONNX Runtime sessions (`engine`), the
//! model contract and calibration (`model`), heatmap rendering (`heatmap`), the serving model and
//! hot reload (`active`), and where models may be read from (`model_source`).

pub(crate) mod active;
pub(crate) mod decode;
pub(crate) mod engine;
pub(crate) mod heatmap;
pub(crate) mod model;
pub(crate) mod model_source;
