"""ONNX graphs: saving and loading with external data, the attention rewrites, the tied embedding."""
