"""Scoring an artifact: the metric table, recorded outputs, evaluation, parity prompts, the PyTorch reference."""
