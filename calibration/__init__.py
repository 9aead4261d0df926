"""Text sources (through `datasets`) and calibration readers for static quantization."""
