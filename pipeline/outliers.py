"""Outlier activation channels moved into a checkpoint without changing its function.

Real LLMs have a few hidden channels whose activations are tens to thousands of times the median; the
built-in model has none, which flatters every quantizer. This moves a power-of-two ``scale`` into
``channels`` hidden channels of every RMSNorm gamma that feeds projections (input_layernorm -> q/k/v,
post_attention_layernorm -> gate/up), dividing those projections' input columns by it, and does the
same between up_proj's rows and down_proj's columns (intermediate channels). Powers of two are exact
in floating point, so the float model computes the same logits bit for bit (a test checks it), and the
projections' inputs now carry channels ``scale`` times larger than before.

What this cannot make: outliers in the residual stream itself. Scaling a residual channel changes the
RMS every norm divides by, so it is not function-preserving; real models' massive activations live
there and reach the projections through the norms, which is the part reproduced here."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from . import families
from .errors import PipelineError


def inject(directory: Path, channels: int, scale: float, seed: int = 0) -> dict:
    """Rewrite the safetensors files in ``directory`` in place; returns what was done (for the manifest)."""
    import torch
    from safetensors.torch import load_file, save_file  # torch: bf16 checkpoints too

    config = json.loads((directory / "config.json").read_text())
    family = families.of(config)
    up, down = family.inner
    hidden_n, inter_n, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    if channels > min(hidden_n, inter_n):
        raise PipelineError(f"model.outliers.channels {channels} exceeds the hidden size {hidden_n} or the "
                            f"intermediate size {inter_n}")
    rng = np.random.default_rng(seed)
    hidden = np.sort(rng.choice(hidden_n, channels, replace=False))
    inter = np.sort(rng.choice(inter_n, channels, replace=False))
    files = sorted(directory.glob("*.safetensors"))
    seen = set()
    for path in files:
        w = load_file(str(path))
        dtypes = {k: v.dtype for k, v in w.items()}
        hidden_t, inter_t = (torch.as_tensor(hidden), torch.as_tensor(inter))
        for i in range(layers):
            p = f"model.layers.{i}."
            for norm, projs in family.norm_inputs.items():
                _scale(w, p + norm + ".weight", (hidden_t,), scale, seen)
                for proj in projs:
                    _scale(w, p + proj + ".weight", (slice(None), hidden_t), 1 / scale, seen)
            _scale(w, p + up + ".weight", (inter_t + family.inner_rows(config),), scale, seen)
            _scale(w, p + down + ".weight", (slice(None), inter_t), 1 / scale, seen)
        assert all(w[k].dtype == d for k, d in dtypes.items())
        save_file(w, str(path), metadata={"format": "pt"})
    names = [n for norm, projs in family.norm_inputs.items() for n in (norm, *projs)] + [up, down]
    expected = {f"model.layers.{i}.{n}.weight" for i in range(layers) for n in names}
    if missing := sorted(expected - seen):
        raise PipelineError(f"model.outliers: the checkpoint has no {missing[0]} (and {len(missing) - 1} more): "
                            f"not the layout pipeline/families/{family.model_type}.py declares")
    return {"channels": channels, "scale": scale, "seed": seed, "hidden_channels": hidden.tolist(),
            "intermediate_channels": inter.tolist()}


def _scale(weights: dict, name: str, index: tuple, factor: float, seen: set) -> None:
    if name not in weights:
        return
    a = weights[name]
    a[index] = a[index] * factor  # a power of two: exact in float32, float16 and bfloat16 alike
    seen.add(name)
