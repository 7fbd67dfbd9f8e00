//! From image bytes to a score: decoding (`decode`), the ONNX Runtime sessions (`engine`), the
//! model contract and calibration (`model`), heatmap rendering (`heatmap`), the serving model and
//! hot reload (`active`), and where models may be read from (`model_source`).

pub mod active;
pub mod decode;
pub mod engine;
pub mod heatmap;
pub mod model;
pub mod model_source;
