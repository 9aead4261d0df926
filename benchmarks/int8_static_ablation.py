"""Which choices make static INT8 meet its budget: each variant built by the real stage and scored by
the real evaluation against the FP32 export.

    python benchmarks/int8_static_ablation.py   (after `dvc repro`; writes benchmarks/int8_static_ablation.json)
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import runner  # noqa: E402
from pipeline.params import load_params  # noqa: E402
from pipeline.scoring.evaluate import evaluate_artifact  # noqa: E402
from stages import int8_static  # noqa: E402

VARIANTS = {
    "naive (MinMax, all MatMuls, no SmoothQuant, lm_head fp32)": {
        "smoothquant.enabled": False, "exclude.lm_head": False, "exclude.activation_matmuls": False,
        "quantize_tied": False},
    "+ attention MatMuls (Q.K^T, P.V) kept float": {
        "smoothquant.enabled": False, "exclude.lm_head": False, "quantize_tied": False},
    "+ tied embedding/lm_head as shared 8-bit table": {"smoothquant.enabled": False},
    "+ SmoothQuant alpha 0.5": {"smoothquant.alpha": 0.5},
    "+ SmoothQuant alpha 0.8 (default)": {},
    "default, per-tensor weights": {"per_channel": False},
    "default, Entropy calibration": {"method": "Entropy"},
    "default, Percentile calibration": {"method": "Percentile"},
    "default, but attention MatMuls quantized": {"exclude.activation_matmuls": False},
}


def main() -> None:
    text = Path("artifacts/data/eval.txt").read_text()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, changes in VARIANTS.items():
            params = load_params("params.yaml", values={f"int8_static.{k}": v for k, v in changes.items()})
            out = Path(tmp) / "q"
            runner.run(int8_static.STAGE, params.int8_static, "artifacts/fused", out)
            m = evaluate_artifact(out, text, params, "artifacts/export", "int8-static")
            rows[name] = {k: m[k] for k in ("ppl", "drift_pct", "kld_mean", "kld_p99", "top1_agreement", "size_ratio")}
            print(f"  {name}: {rows[name]}", file=sys.stderr, flush=True)
            shutil.rmtree(out)
    Path("benchmarks/int8_static_ablation.json").write_text(json.dumps(rows, indent=2) + "\n")
    print("| variant | drift % | KLD mean | KLD p99 | top-1 | size |\n|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['drift_pct']:+.3f} | {r['kld_mean']:.2e} | {r['kld_p99']:.2e} | "
              f"{r['top1_agreement']:.2%} | {r['size_ratio']:.3f} |")


if __name__ == "__main__":
    main()
