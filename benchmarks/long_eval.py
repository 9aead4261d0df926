"""Long-context accuracy at a real shape: collect `pipeline evaluate` results at long windows (eval.ctx
4k / 16k / 32k, eval.score_last N) beside each artifact's own short-window figures (its manifest's,
scored when it was built), into one results file for docs/long-context.md.

The runs themselves are plain CLI calls, one per artifact and length, e.g.

    pipeline evaluate -S model.source=random:qwen3-0.6b -S eval.ctx=16384 -S eval.score_last=256 \\
        -S eval.max_windows=1 --artifact A/int4 --reference A/export --text A/data/train.txt \\
        --name int4 --out EVALS/int4-16384.json

and `--reference A/int4 --out EVALS/int4-kv8-16384-vs-int4.json` isolates the int8 KV cache."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

FIGURES = ("ppl", "ref_ppl", "drift_pct", "kld_mean", "kld_p99", "top1_agreement", "tokens_scored", "windows", "ctx")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--evals", type=Path, required=True, help="directory of <artifact>-<ctx>[-vs-<ref>].json")
    ap.add_argument("--artifacts", type=Path, required=True, help="the artifacts' directory (their manifests)")
    ap.add_argument("--shape", default="qwen3-0.6b", help="what the artifacts were built from, for the record")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--keep", type=Path, help="an earlier results file: its runs that these evals do not repeat "
                                              "(same artifact, reference and window) are kept, marked as earlier")
    args = ap.parse_args()
    by_id = {}  # artifact id -> its directory's name (--name may differ from the directory)
    for manifest in args.artifacts.glob("*/manifest.json"):
        by_id.setdefault(json.loads(manifest.read_text())["artifact_id"], manifest.parent.name)
    rows = []
    for path in sorted(args.evals.glob("*.json")):
        r = json.loads(path.read_text())
        rows.append({"artifact": by_id.get(r["artifact_id"], r["artifact"]), "reference": r["reference"],
                     "artifact_id": r["artifact_id"], **{k: r.get(k) for k in FIGURES}})
    short = {}
    for r in rows:
        m = json.loads((args.artifacts / r["artifact"] / "manifest.json").read_text())
        ev = m["metrics"].get("eval") or {}
        short[r["artifact_id"]] = {k: ev.get(k) for k in ("drift_pct", "kld_mean", "kld_p99", "top1_agreement", "ctx",
                                                           "windows", "tokens_scored")}
        kv = m.get("kv_dtype") or "float32"
        r["kv_dtype"] = kv
    if args.keep:  # an earlier build's runs: their artifacts (other ids) are gone, their figures are not
        earlier = json.loads(args.keep.read_text())
        done = {(r["artifact"], r["reference"], r["ctx"]) for r in rows}
        for r in earlier["runs"]:
            if (r["artifact"], r["reference"], r["ctx"]) not in done:
                rows.append({**r, "earlier": r.get("earlier") or earlier["date"]})
                # keyed by artifact id (files before 2026-12-04: by name, one build per file)
                was = earlier["short_window"].get(r["artifact_id"]) or earlier["short_window"].get(r["artifact"])
                if was and r["artifact_id"] not in short:
                    short[r["artifact_id"]] = {**was, "earlier": was.get("earlier") or earlier["date"]}
    doc = {"shape": args.shape, "date": time.strftime("%Y-%m-%d"), "text": "the data artifact's train split",
           "note": "random weights: perplexity means nothing, drift / KLD / top-1 against the reference do",
           "short_window": short, "runs": sorted(rows, key=lambda r: (r["ctx"], r["artifact"], r["reference"]))}
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.out}: {len(rows)} runs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
