"""The fixed prompts of every parity check: max |delta logit| on their prefill and a greedy
continuation that must match (compared in pipeline/scoring/outputs.py, one model in memory at a time)."""

PROMPTS = (
    "The for statement is used to iterate over",
    "Exceptions are raised when",
    "def main():\n    ",
    "A class definition defines a class object",
)
