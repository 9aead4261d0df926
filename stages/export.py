"""Stage `export`: HF checkpoint -> FP32 ONNX merged decoder with KV cache (optimum-onnx), checked
against PyTorch (ONNX checker, max |delta logit|, 32 greedy tokens)."""

from __future__ import annotations

import contextlib
import gc
import io
import json
import logging
import shutil
import time
import warnings
from pathlib import Path

from pipeline import manifest as mf
from pipeline import onnx_io, outputs, parity, store
from pipeline.errors import PipelineError
from pipeline.log import heartbeat, info
from pipeline.tied import retie_embedding

TASK = "text-generation-with-past"


@contextlib.contextmanager
def _bounded_export_memory():
    """Two steps of the export would otherwise hold a second copy of the weights:

    - optimum re-saves a model over 2 GB into one data file by loading every tensor while the PyTorch
      model is still alive; here its check for external data answers no, and :func:`onnx_io.save_ir`
      writes the one data file tensor by tensor instead;
    - torch's ONNX shape inference serializes each node with its weights, allocating and freeing
      weight-sized buffers; glibc's adaptive mmap threshold then serves them from the heap, which keeps
      what was freed (+1.1 GB measured at Qwen3-0.6B). A fixed threshold gives it back."""
    import ctypes

    from optimum.exporters.onnx import convert

    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD = 1 MiB
    except (OSError, AttributeError):
        pass  # not glibc: nothing to tune
    check = convert.check_model_uses_external_data
    convert.check_model_uses_external_data = lambda model: False
    try:
        yield
    finally:
        convert.check_model_uses_external_data = check


def _check_exportable(config: dict) -> None:
    import optimum.exporters.onnx.model_configs  # noqa: F401  (registers the ONNX configs with TasksManager)
    from optimum.exporters.tasks import TasksManager

    model_type = config.get("model_type", "?")
    try:
        tasks = TasksManager.get_supported_tasks_for_model_type(model_type.replace("_", "-"), exporter="onnx",
                                                                 library_name="transformers")
    except (KeyError, ValueError):
        tasks = {}
    if TASK not in tasks:
        raise PipelineError(f"optimum-onnx cannot export model_type {model_type!r} as {TASK}; "
                            f"use a causal LM architecture it supports (qwen3, llama, mistral, ...)")


def optimum_export(checkpoint_dir: str, raw: str, opset: int, trust_remote_code: bool) -> None:
    """optimum-onnx's export, run by :func:`run` in a child process (``store.in_child``): torch's exporter
    leaves a sharded checkpoint's weights mapped after it returns (7.4 GB at Qwen3-1.7B), and the
    parity check that follows loads PyTorch and an ORT session, one after the other."""
    from optimum.exporters.onnx import main_export

    logging.getLogger("optimum").setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings(), _bounded_export_memory():
            warnings.simplefilter("ignore")  # torch.jit tracer warnings on every export
            # no_post_process: optimum's tied-weight de-duplication serializes the whole model in
            # memory and fails on any model over protobuf's 2 GB (every Qwen3 up to 4B in FP32);
            # the table is stored once on any size (fold_constants keeps the lm_head's Transpose).
            # do_constant_folding=False: torch's folding copies every transposed weight in memory;
            # onnx_io.fold_constants folds the same nodes, lazily.
            main_export(checkpoint_dir, output=raw, task=TASK, opset=opset, device="cpu", do_validation=False,
                        local_files_only=True, trust_remote_code=trust_remote_code, no_post_process=True,
                        do_constant_folding=False)
    except Exception as exc:
        raise PipelineError(f"optimum-onnx export of {checkpoint_dir} failed: "
                            f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}") from None


def run(params: dict, checkpoint_dir: str | Path, out: str | Path, evaluation: dict | None = None) -> dict:
    """``evaluation`` = {text, reference: the checkpoint, params}: score the export against PyTorch on
    held-out text when built, recorded in the manifest and model card (see pipeline.derive)."""
    from pipeline.derive import check, decode_speed, summary_figures
    from pipeline.torch_ref import trusted

    checkpoint_dir = Path(checkpoint_dir)
    parent = mf.read_manifest(checkpoint_dir)
    mf.expect_stage(parent, ("checkpoint",), checkpoint_dir)
    config = json.loads((checkpoint_dir / "config.json").read_text())
    _check_exportable(config)
    opset = int(params["opset"])
    t0 = time.perf_counter()
    with store.staging_dir(out) as tmp, store.scratch_dir(tmp, "raw") as raw, \
            store.scratch_dir(tmp, "outputs") as scratch:
        info(f"export: optimum-onnx {TASK}, opset {opset} ...")
        with heartbeat("export"):
            _, child_peak = store.in_child(optimum_export, str(checkpoint_dir), str(raw), opset,
                                           trusted(checkpoint_dir))
        raw = Path(raw)
        model = onnx_io.load_ir(raw)  # weights stay on disk, streamed into the artifact
        folded = onnx_io.fold_constants(model)
        retied = retie_embedding(model) if config.get("tie_word_embeddings", True) else []
        onnx_io.save_ir(model, tmp)
        del model
        gc.collect()  # the graph's nodes and values form cycles: free its mapped weights now
        onnx_io.copy_side_files(raw, tmp)
        for f in raw.iterdir():  # the raw export goes now
            shutil.rmtree(f) if f.is_dir() else f.unlink()
        graph = onnx_io.load(tmp, load_external_data=False)
        counts, opset_found = onnx_io.op_counts(graph), onnx_io.opset(graph)
        onnx_io.copy_side_files(checkpoint_dir, tmp)  # tokenizer and config files
        export_s = time.perf_counter() - t0
        onnx_io.check(tmp / onnx_io.MODEL)
        info(f"export: graph checked ({export_s:.1f} s); parity with PyTorch on {len(parity.PROMPTS)} prompts ...")
        result, scored, mine = check(tmp, "export", checkpoint_dir, int(params["greedy_tokens"]), evaluation,
                                     Path(scratch))
        if not result["greedy_match"]:
            raise PipelineError(f"export parity failed: greedy tokens differ from PyTorch (prefix match "
                                f"{result['greedy_prefix_match']:.0%}, max |dlogit| {result['max_abs_logit_delta']:.2e})")
        if result["max_abs_logit_delta"] > float(params["max_abs_logit_delta"]):
            raise PipelineError(f"export parity failed: max |dlogit| {result['max_abs_logit_delta']:.2e} > "
                                f"export.max_abs_logit_delta {params['max_abs_logit_delta']}")
        metrics = {**result, "export_seconds": round(export_s, 2), "stage_seconds": round(time.perf_counter() - t0, 2),
                   "op_counts": counts, "decode": decode_speed(result), "retied_initializers": retied,
                   "folded_nodes": folded,
                   "child_peak_rss_mb": child_peak}
        if scored:
            metrics["eval"] = scored
        manifest = store.publish(tmp, out, stage="export", params=params, parent=parent, source=parent["source"],
                                 metrics=metrics, extra={"opset": opset_found, "task": TASK,
                                                         "precision": "fp32", "kv_dtype": "float32"})
        outputs.keep(mine, out)  # every derived artifact is parity-checked and scored against the export
    info(f"export: {manifest['artifact_id']} fp32 {manifest['size_bytes'] / 1e6:.1f} MB, opset {manifest['opset']}, "
         f"max |dlogit| vs PyTorch {result['max_abs_logit_delta']:.2e}, greedy {result['greedy_tokens']} tokens "
         f"identical on {result['greedy_prompts']} prompts{summary_figures(scored) if scored else ''}, {export_s:.1f} s")
    return manifest
