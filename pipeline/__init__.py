"""qwen-onnx-pipeline: Hugging Face causal LM -> validated, versioned ONNX artifacts."""

__version__ = "0.1.0"
