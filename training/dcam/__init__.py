"""DCAM: attention-aware entropy distillation for multi-class anomaly detection."""
__version__ = "0.5.0"  # the default dcam.version of an export (models/dcam.onnx: 0.5.0)
