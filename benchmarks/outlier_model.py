"""A copy of a Qwen3 checkpoint with outlier activation channels, computing the same function.

Real LLMs have a few hidden channels whose activations are tens to thousands of times the rest; the
built-in model has none, which flatters quantization. This moves a power-of-two scale ``--scale`` into
``--channels`` hidden channels of every RMSNorm gamma that feeds projections (input_layernorm ->
q/k/v, post_attention_layernorm -> gate/up) and divides those projections' input columns by it, and
does the same between up_proj rows and down_proj columns (intermediate channels). Powers of two are
exact in floating point, so the float model is the same function; its projection inputs now have
outlier channels.

    python benchmarks/outlier_model.py artifacts/checkpoint /tmp/outlier --channels 4 --scale 64
    pipeline checkpoint --source /tmp/outlier ...   (then every stage as usual)
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--channels", type=int, default=4)
    ap.add_argument("--scale", type=float, default=64.0)
    args = ap.parse_args()
    from safetensors.numpy import load_file, save_file

    if args.scale != 2.0 ** round(np.log2(args.scale)):
        raise SystemExit("--scale must be a power of two (exact in floating point)")
    args.out.mkdir(parents=True, exist_ok=True)
    for f in args.checkpoint.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name != "manifest.json":
            shutil.copy2(f, args.out / f.name)
    config = json.loads((args.checkpoint / "config.json").read_text())
    rng = np.random.default_rng(0)
    hidden = rng.choice(config["hidden_size"], args.channels, replace=False)
    inter = rng.choice(config["intermediate_size"], args.channels, replace=False)
    s = np.float32(args.scale)
    for path in sorted(args.checkpoint.glob("*.safetensors")):
        w = load_file(str(path))
        for i in range(config["num_hidden_layers"]):
            p = f"model.layers.{i}."
            for norm, projs in (("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                                ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"))):
                w[p + norm + ".weight"][hidden] *= s
                for proj in projs:
                    w[p + proj + ".weight"][:, hidden] /= s
            w[p + "mlp.up_proj.weight"][inter, :] *= s
            w[p + "mlp.down_proj.weight"][:, inter] /= s
        save_file(w, str(args.out / path.name), metadata={"format": "pt"})
    print(f"wrote {args.out}: {args.channels} hidden and {args.channels} intermediate channels x{args.scale:g} in "
          f"{config['num_hidden_layers']} layers")


if __name__ == "__main__":
    main()
