//! From image bytes to a score: decoding (`decode`), the ONNX Runtime sessions (`engine`), the
//! model contract and calibration (`model`), and heatmap rendering (`heatmap`).

pub mod active;
pub mod decode;
pub mod engine;
pub mod heatmap;
pub mod model;
