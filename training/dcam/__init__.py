"""DCAM: attention-aware entropy distillation for multi-class anomaly detection."""
__version__ = "0.2.0"
