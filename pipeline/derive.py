"""What every derived ONNX stage (fused, fp16, int8-*, int4) shares: verify the parent, build into a
temp dir, check the graph, check parity against the parent, publish with a manifest."""

from __future__ import annotations

import gc
import time
from pathlib import Path
from typing import Callable

from . import evaluate
from . import manifest as mf
from . import onnx_io, outputs, parity, store
from .errors import PipelineError
from .evaluate import model_bytes
from .log import heartbeat, info
from .runtime import Runtime, load_tokenizer
from .verify import verify

ONNX_STAGES = ("export", "fused", "fp16", "int8-dynamic", "int8-static", "int4")


def decode_speed(parity_result: dict) -> dict | None:
    """The candidate's greedy decode rate measured during the parity check, with the machine named."""
    tok_s = parity_result.get("candidate_decode_tok_s")
    if not tok_s:
        return None
    return {"tok_s": tok_s, "tokens": parity_result["greedy_tokens"] * parity_result["greedy_prompts"],
            "machine": {**mf.machine(), "provider": "CPU EP"}}


def open_model(artifact_dir: Path) -> Callable[[], object]:
    """How to load an artifact as a scorer: the ONNX runtime, or PyTorch for the checkpoint."""
    if (Path(artifact_dir) / "model.onnx").is_file():
        return lambda: Runtime(artifact_dir)
    from .torch_ref import TorchModel

    return lambda: TorchModel(artifact_dir)


def encoder(artifact_dir: Path) -> Callable[[str], list[int]]:
    """The artifact's tokenizer as Runtime.encode uses it, without opening a session."""
    tok = load_tokenizer(artifact_dir)
    return lambda text: tok.encode(text, add_special_tokens=False).ids


def check(candidate_dir: Path, label: str, parent_dir: Path, greedy_tokens: int, evaluation: dict | None,
          scratch: Path) -> tuple[dict, dict | None, dict]:
    """Parity with the parent and scoring against ``evaluation["reference"]``, one model in memory at
    a time: each reference's outputs come from its cache (pipeline/outputs.py) or are recorded once,
    then the candidate runs alone and records its own into ``scratch``.
    Returns (parity result, eval record or None, the candidate's recorded outputs)."""
    encode = encoder(candidate_dir)
    prompts = [encode(p) for p in parity.PROMPTS]
    windows = ref_dir = None
    if evaluation:
        ref_dir = Path(evaluation["reference"])
        windows = evaluate.make_windows(encode(evaluation["text"]), *evaluate.window_params(evaluation["params"]))
    same = ref_dir is not None and ref_dir.resolve() == parent_dir.resolve()
    parent_out = outputs.reference(parent_dir, open_model(parent_dir), prompts=prompts, greedy_tokens=greedy_tokens,
                                   windows=windows if same else None, label=f"{label}: parent {parent_dir.name}")
    ref_out = parent_out if same else (outputs.reference(ref_dir, open_model(ref_dir), windows=windows,
                                                         label=f"{label}: reference {ref_dir.name}")
                                       if ref_dir is not None else None)
    info(f"{label}: running the new artifact on {len(prompts)} prompts"
         + (f" and {len(windows)} eval windows ..." if windows is not None else " ..."))
    model = open_model(candidate_dir)()
    mine = {"prompts": outputs.record_prompts(model, prompts, greedy_tokens, scratch / outputs.prompts_key(
        prompts, greedy_tokens))}
    if windows is not None:
        mine["windows"] = outputs.record_windows(model, windows, scratch / outputs.windows_key(windows),
                                                 label=f"{label} eval")
    del model
    result = outputs.compare_prompts(mine["prompts"], parent_out["prompts"])
    scored = None
    if windows is not None:
        ref_manifest = verify(ref_dir, load=False)
        scored = {"reference": ref_manifest["stage"], "reference_id": ref_manifest["artifact_id"],
                  "text_sha256": evaluate.text_sha256(evaluation["text"]),
                  "max_windows": evaluate.window_params(evaluation["params"])[1],
                  **outputs.compare_windows(mine["windows"], ref_out["windows"])}
        if ref_manifest["stage"] != "checkpoint":
            scored["size_ratio"] = model_bytes(candidate_dir) / model_bytes(ref_dir)
    return result, scored, mine


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
    with store.staging_dir(out) as tmp, store.scratch_dir(tmp, "outputs") as scratch:
        with heartbeat(stage):
            made = build(parent_dir, parent, tmp)
        gc.collect()  # the build's graph and weights are gone before any model is loaded
        onnx_io.copy_side_files(parent_dir, tmp)
        # The graph check is onnxruntime loading it (in check below): fused graphs hold ORT-only ops
        # (SimplifiedLayerNormalization, com.microsoft.*) that onnx.checker does not know.
        build_s = time.perf_counter() - t0
        info(f"{stage}: built in {build_s:.1f} s; parity with {parent['stage']} ...")
        result, scored, mine = check(tmp, stage, parent_dir, greedy_tokens, evaluation, Path(scratch))
        if require_greedy_match and not result["greedy_match"]:
            raise PipelineError(f"{stage} parity failed: greedy tokens differ from {parent['stage']} (prefix match "
                                f"{result['greedy_prefix_match']:.0%}, max |dlogit| {result['max_abs_logit_delta']:.2e})")
        metrics = {**made.get("metrics", {}), "parity_vs_parent": result, "stage_seconds": round(build_s, 2),
                   "decode": decode_speed(result)}
        if scored:
            metrics["eval"] = scored
        extra = made.get("extra", {})
        extra.setdefault("opset", onnx_io.opset(onnx_io.load(tmp, load_external_data=False)))
        manifest = store.publish(tmp, out, stage=stage, params=params, parent=parent, source=parent["source"],
                                 metrics=metrics, extra=extra)
        if stage in outputs.REFERENCE_STAGES:
            outputs.keep(mine, out)
    size = model_bytes(Path(out))
    line = (f"{stage}: {manifest['artifact_id']} {size / 1e6:.1f} MB ({size / model_bytes(parent_dir):.3f}x "
            f"{parent['stage']}), max |dlogit| vs {parent['stage']} {result['max_abs_logit_delta']:.2e}, greedy prefix "
            f"match {result['greedy_prefix_match']:.0%}")
    info(line + (summary_figures(scored) if scored else "") + f", {build_s:.1f} s")
    return manifest


def summary_figures(ev: dict) -> str:
    return (f", ppl {ev['ppl']:.3f}, drift {ev['drift_pct']:+.3f} % vs {ev['reference']}, KLD {ev['kld_mean']:.2e}, "
            f"top-1 {ev['top1_agreement']:.2%}")
