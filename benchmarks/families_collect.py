"""Collect a family's real-shape run (`pipeline <stage> --run-metrics` files and the artifacts' manifests)
into one results file, for docs/real-shapes.md's table:

    python benchmarks/families_collect.py OUT.json NAME=DIR [NAME=DIR ...]

DIR holds the stages' artifacts (checkpoint, export, fused, imatrix, int4) and their ``m_<stage>.json``
run metrics, as the commands in docs/real-shapes.md ("Other families at their real width") write them."""

from __future__ import annotations

import json
import sys
from pathlib import Path

STAGES = ("checkpoint", "export", "fused", "imatrix", "int4")


def collect(directory: Path) -> dict:
    out = {}
    for stage in STAGES:
        run = json.loads((directory / f"m_{stage}.json").read_text())
        manifest = json.loads((directory / stage / "manifest.json").read_text())
        m = manifest["metrics"]
        row = {"artifact_id": manifest["artifact_id"], "size_mb": round(manifest["size_bytes"] / 1e6, 1),
               "wall_s": run["wall_seconds"], "peak_rss_mb": run["peak_rss_mb"], "machine": run["machine"]}
        if "eval" in m:
            row.update({k: m["eval"][k] for k in ("kld_mean", "top1_agreement") if k in m["eval"]})
        if "parity_vs_parent" in m:
            row["max_abs_logit_delta"] = m["parity_vs_parent"].get("max_abs_logit_delta")
        if stage == "checkpoint":
            row["source"] = manifest["source"]["model"]
            row["fp32_gb"] = round(sum(f["size"] for f in manifest["files"] if f["path"].endswith(".safetensors")) / 1e9, 2)
        out[stage] = row
    return out


def main() -> None:
    out = Path(sys.argv[1])
    result = {name: collect(Path(d)) for name, d in (a.split("=", 1) for a in sys.argv[2:])}
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
