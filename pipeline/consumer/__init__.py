"""What a consumer of an artifact needs: the reference runtime, chat templates, the genai config, the manifest and its verification (numpy, onnxruntime, tokenizers, jinja2: no torch)."""
