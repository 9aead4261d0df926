"""What every derived ONNX stage (fused, fp16, int8-*, int4) shares: verify the parent, build into a
temp dir, check the graph, check parity against the parent, publish with a manifest."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from . import manifest as mf
from . import onnx_io, parity, store
from .errors import PipelineError
from .evaluate import model_bytes
from .log import heartbeat, info
from .runtime import Runtime
from .verify import verify

ONNX_STAGES = ("export", "fused", "fp16", "int8-dynamic", "int8-static", "int4")


def derive(parent_dir: str | Path, out: str | Path, stage: str, params: dict,
           build: Callable[[Path, dict, Path], dict], parents: tuple[str, ...] = ONNX_STAGES,
           require_greedy_match: bool = False, greedy_tokens: int = 32) -> dict:
    """``build(parent_dir, parent_manifest, tmp)`` writes model.onnx(+data) into tmp and returns
    ``{"metrics": {...}, "extra": {...}}``; the rest (side files, checks, parity, manifest) is here."""
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
        result = parity.check(candidate, Runtime(parent_dir), candidate.encode, greedy_tokens)
        if require_greedy_match and not result["greedy_match"]:
            raise PipelineError(f"{stage} parity failed: greedy tokens differ from {parent['stage']} (prefix match "
                                f"{result['greedy_prefix_match']:.0%}, max |dlogit| {result['max_abs_logit_delta']:.2e})")
        metrics = {**made.get("metrics", {}), "parity_vs_parent": result, "stage_seconds": round(build_s, 2)}
        extra = made.get("extra", {})
        extra.setdefault("opset", onnx_io.opset(onnx_io.load(tmp, load_external_data=False)))
        manifest = store.publish(tmp, out, stage=stage, params=params, parent=parent, source=parent["source"],
                                 metrics=metrics, extra=extra)
    size = model_bytes(Path(out))
    info(f"{stage}: {manifest['artifact_id']} {size / 1e6:.1f} MB ({size / model_bytes(parent_dir):.3f}x {parent['stage']}), "
         f"max |dlogit| vs {parent['stage']} {result['max_abs_logit_delta']:.2e}, greedy prefix match "
         f"{result['greedy_prefix_match']:.0%}, {build_s:.1f} s")
    return manifest
