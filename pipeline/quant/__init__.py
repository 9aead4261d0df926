"""Quantizers and their statistics: block quantization, the importance matrix, SmoothQuant, rounding."""
