"""ONNX export of the detector: plain ONNX ops, or TensorRT's deformable-attention plugin node."""
from .onnx_export import PLUGIN_DOMAIN, PLUGIN_OP, ExportedDetector, attention_mode, export_onnx

__all__ = ["export_onnx", "ExportedDetector", "attention_mode", "PLUGIN_OP", "PLUGIN_DOMAIN"]
