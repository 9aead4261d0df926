"""What every derived ONNX stage (fused, fp16, int8-*, int4) shares: verify the parent, build into a
temp dir, check the graph, check parity against the parent, publish with a manifest."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from . import evaluate
from . import manifest as mf
from . import onnx_io, parity, store
from .errors import PipelineError
from .evaluate import model_bytes
from .log import heartbeat, info
from .runtime import Runtime
from .verify import verify

ONNX_STAGES = ("export", "fused", "fp16", "int8-dynamic", "int8-static", "int4")


def decode_speed(parity_result: dict) -> dict | None:
    """The candidate's greedy decode rate measured during the parity check, with the machine named."""
    tok_s = parity_result.get("candidate_decode_tok_s")
    if not tok_s:
        return None
    return {"tok_s": tok_s, "tokens": parity_result["greedy_tokens"] * parity_result["greedy_prompts"],
            "machine": {**mf.machine(), "provider": "CPU EP"}}


def evaluation_record(candidate, evaluation: dict | None, label: str, reference=None) -> dict | None:
    """Score the freshly built ``candidate`` against ``evaluation["reference"]`` on its text.

    ``reference``: that reference's scorer when the caller already has it open (the parent used for
    parity), so it is never loaded twice; else it is opened here."""
    if not evaluation:
        return None
    ref_dir = Path(evaluation["reference"])
    ref_manifest = verify(ref_dir, load=False)
    if reference is None:
        reference = Runtime(ref_dir)
    info(f"{label}: scoring against {ref_manifest['stage']} on the held-out text ...")
    record = evaluate.score_record(candidate, reference, ref_manifest, evaluation["text"], evaluation["params"],
                                   label=f"{label} vs {ref_manifest['stage']}")
    if ref_manifest["stage"] != "checkpoint":
        record["size_ratio"] = model_bytes(Path(candidate.dir)) / model_bytes(ref_dir)
    return record


def derive(parent_dir: str | Path, out: str | Path, stage: str, params: dict,
           build: Callable[[Path, dict, Path], dict], parents: tuple[str, ...] = ONNX_STAGES,
           require_greedy_match: bool = False, greedy_tokens: int = 32, evaluation: dict | None = None) -> dict:
    """``build(parent_dir, parent_manifest, tmp)`` writes model.onnx(+data) into tmp and returns
    ``{"metrics": {...}, "extra": {...}}``; the rest (side files, checks, parity, scoring against
    ``evaluation`` = {text, reference, params}, manifest and model card) is here."""
    parent_dir = Path(parent_dir)
    parent = verify(parent_dir, load=False)
    mf.expect_stage(parent, parents, parent_dir)
    t0 = time.perf_counter()
    with store.staging_dir(out) as tmp:
        with heartbeat(stage):
            made = build(parent_dir, parent, tmp)
        onnx_io.copy_side_files(parent_dir, tmp)
        # The graph check is onnxruntime loading it (Runtime below): fused graphs hold ORT-only ops
        # (SimplifiedLayerNormalization, com.microsoft.*) that onnx.checker does not know.
        build_s = time.perf_counter() - t0
        info(f"{stage}: built in {build_s:.1f} s; parity with {parent['stage']} ...")
        candidate = Runtime(tmp)
        parent_rt = Runtime(parent_dir)
        result = parity.check(candidate, parent_rt, candidate.encode, greedy_tokens)
        if require_greedy_match and not result["greedy_match"]:
            raise PipelineError(f"{stage} parity failed: greedy tokens differ from {parent['stage']} (prefix match "
                                f"{result['greedy_prefix_match']:.0%}, max |dlogit| {result['max_abs_logit_delta']:.2e})")
        if evaluation and Path(evaluation["reference"]).resolve() != parent_dir.resolve():
            parent_rt = None  # at most the candidate and one reference in memory
        scored = evaluation_record(candidate, evaluation, stage, parent_rt)
        metrics = {**made.get("metrics", {}), "parity_vs_parent": result, "stage_seconds": round(build_s, 2),
                   "decode": decode_speed(result)}
        if scored:
            metrics["eval"] = scored
        extra = made.get("extra", {})
        extra.setdefault("opset", onnx_io.opset(onnx_io.load(tmp, load_external_data=False)))
        manifest = store.publish(tmp, out, stage=stage, params=params, parent=parent, source=parent["source"],
                                 metrics=metrics, extra=extra)
    size = model_bytes(Path(out))
    line = (f"{stage}: {manifest['artifact_id']} {size / 1e6:.1f} MB ({size / model_bytes(parent_dir):.3f}x "
            f"{parent['stage']}), max |dlogit| vs {parent['stage']} {result['max_abs_logit_delta']:.2e}, greedy prefix "
            f"match {result['greedy_prefix_match']:.0%}")
    info(line + (summary_figures(scored) if scored else "") + f", {build_s:.1f} s")
    return manifest


def summary_figures(ev: dict) -> str:
    return (f", ppl {ev['ppl']:.3f}, drift {ev['drift_pct']:+.3f} % vs {ev['reference']}, KLD {ev['kld_mean']:.2e}, "
            f"top-1 {ev['top1_agreement']:.2%}")
