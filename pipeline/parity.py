"""Parity between two models on fixed prompts: max |delta logit| on prefill and greedy-token match."""

from __future__ import annotations

import time

import numpy as np

PROMPTS = (
    "The for statement is used to iterate over",
    "Exceptions are raised when",
    "def main():\n    ",
    "A class definition defines a class object",
)


def check(candidate, reference, encode, greedy_tokens: int = 32) -> dict:
    """``candidate``/``reference`` expose ``logits(ids)`` and ``greedy(ids, n)``; ``encode`` tokenizes."""
    max_delta, matched, total, identical, greedy_s = 0.0, 0, 0, True, 0.0
    for prompt in PROMPTS:
        ids = encode(prompt)
        a = candidate.logits(np.asarray(ids))
        b = reference.logits(np.asarray(ids))
        max_delta = max(max_delta, float(np.abs(a.astype(np.float64) - b).max()))
        t0 = time.perf_counter()
        ga = candidate.greedy(ids, greedy_tokens)
        greedy_s += time.perf_counter() - t0
        gb = reference.greedy(ids, greedy_tokens)
        same = next((i for i, (x, y) in enumerate(zip(ga, gb)) if x != y), len(ga))
        matched += same
        total += greedy_tokens
        identical &= ga == gb
    return {"max_abs_logit_delta": max_delta, "greedy_tokens": greedy_tokens, "greedy_prompts": len(PROMPTS),
            "greedy_match": identical, "greedy_prefix_match": matched / total,
            "candidate_decode_tok_s": round(total / greedy_s, 1) if greedy_s > 0 else None}
