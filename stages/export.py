"""Stage `export`: HF checkpoint -> FP32 ONNX merged decoder with KV cache (optimum-onnx), checked
against PyTorch (ONNX checker, max |delta logit|, 32 greedy tokens).

optimum traces a model without weights (``torch_ref.skeleton``: each parameter one scalar broadcast to
its shape) and torch's exporter writes no parameter (``export_params=False``: they become graph inputs),
so the export never holds the model in float32; each parameter is then made an initializer read from
the checkpoint's safetensors, upcast exactly, one tensor at a time as the artifact is written."""

from __future__ import annotations

import gc
import json
import time
from pathlib import Path

from pydantic import Field

from pipeline import compat
from pipeline.errors import PipelineError, first_line
from pipeline.graph import onnx_io
from pipeline.log import info
from pipeline.onnx_post import OnnxStage
from pipeline.ops import store
from pipeline.ops.child import in_child
from pipeline.runner import BuildResult, Inputs
from pipeline.schema import PosInt, Section
from pipeline.scoring.torch_ref import trusted


class Export(Section):
    opset: int = Field(ge=14, le=21)
    greedy_tokens: int = PosInt
    max_abs_logit_delta: float = Field(gt=0)


TASK = "text-generation-with-past"
PARAMS = "skeleton_params.json"  # the names of the parameters the child traced, beside its graph


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
    """optimum-onnx's export of the checkpoint's weightless skeleton, run by :func:`build` in a child
    process (``pipeline.ops.child.in_child``): torch's exporter keeps what it allocated after it returns,
    and the parity check that follows loads PyTorch and an ORT session, one after the other."""
    from optimum.exporters.onnx import main_export

    from pipeline.scoring.torch_ref import skeleton

    model, names = skeleton(checkpoint_dir, trust_remote_code)
    try:
        with compat.optimum_export_in_bounded_memory(), compat.optimum_traces_a_skeleton(model), \
                compat.torch_exports_no_params():
            # no_post_process: optimum's tied-weight de-duplication serializes the whole model in
            # memory and fails on any model over protobuf's 2 GB (every Qwen3 up to 4B in FP32);
            # the table is stored once on any size (fold_constants keeps the lm_head's Transpose).
            # do_constant_folding=False: torch's folding would fold the skeleton's values, and copies
            # every transposed weight in memory; onnx_io.fold_constants folds the same nodes, lazily.
            main_export(checkpoint_dir, output=raw, task=TASK, opset=opset, device="cpu", do_validation=False,
                        local_files_only=True, trust_remote_code=trust_remote_code, no_post_process=True,
                        do_constant_folding=False)
    except Exception as exc:
        raise PipelineError(f"optimum-onnx export of {checkpoint_dir} failed: "
                            f"{type(exc).__name__}: {first_line(exc, 300)}") from None
    (Path(raw) / PARAMS).write_text(json.dumps(names))


def put_weights(model, names: list[str], checkpoint_dir: Path) -> None:
    """Turn, in the exported onnx-ir ``model``, each parameter the skeleton traced (a graph input named
    as its state-dict entry: the export ran with ``export_params=False``) into an initializer read
    lazily from the checkpoint's safetensors, one tensor at a time when ``onnx_io.save_ir`` writes it.
    Every parameter must be there once, with the checkpoint's shape."""
    import onnx_ir as ir

    from pipeline.scoring.torch_ref import checkpoint_tensors, read_float32

    graph = model.graph
    inputs = {v.name: v for v in graph.inputs}
    files = checkpoint_tensors(checkpoint_dir)
    missing = [n for n in names if n not in inputs]
    if missing:
        raise PipelineError(f"export: {len(missing)} parameter(s) not in the traced graph ({', '.join(missing[:3])}); "
                            f"the weightless export cannot place them")
    for name in names:
        value = inputs[name]
        if name not in files:
            raise PipelineError(f"export: the checkpoint's safetensors have no tensor {name!r}, which the "
                                f"model's code declares; the checkpoint is incomplete")
        source, stored = files[name]
        shape = tuple(value.shape.numpy())
        if tuple(stored) != shape:
            raise PipelineError(f"export: checkpoint tensor {name} has shape {list(stored)}, the model's code "
                                f"declares {list(shape)}; config.json and the weights disagree")
        graph.inputs.remove(value)
        value.const_value = ir.LazyTensor(lambda source=source, name=name: ir.tensor(read_float32(source, name), name=name),
                                          dtype=ir.DataType.FLOAT, shape=ir.Shape(shape), name=name)
        graph.register_initializer(value)


def build(inputs: Inputs, config: Export, tmp: Path) -> BuildResult:
    checkpoint_dir = inputs.dir
    model_config = json.loads((checkpoint_dir / "config.json").read_text())
    _check_exportable(model_config)
    t0 = time.perf_counter()
    with store.scratch_dir(tmp, "raw") as raw:
        info(f"export: optimum-onnx {TASK}, opset {config.opset} ...")
        _, child_peak = in_child(optimum_export, str(checkpoint_dir), str(raw), config.opset, trusted(checkpoint_dir))
        raw = Path(raw)
        model = onnx_io.load_ir(raw)  # the graph alone: its parameters are inputs
        put_weights(model, json.loads((raw / PARAMS).read_text()), checkpoint_dir)
        folded = onnx_io.fold_constants(model)
        onnx_io.save_ir(model, tmp)
        del model
        gc.collect()  # the graph's nodes and values form cycles: free its mapped weights now
        onnx_io.copy_side_files(raw, tmp)
    graph = onnx_io.load(tmp, load_external_data=False)
    onnx_io.check(tmp / onnx_io.MODEL)
    return BuildResult(metrics={"op_counts": onnx_io.op_counts(graph), "folded_nodes": folded},
                       extra={"opset": onnx_io.opset(graph), "task": TASK, "precision": "fp32", "kv_dtype": "float32"},
                       run={"export_seconds": round(time.perf_counter() - t0, 2), "child_peak_rss_mb": child_peak})


STAGE = OnnxStage(name="export", section="export", config=Export, build=build, parents=("checkpoint",),
                  reference="checkpoint", require_greedy_match=True, keep_outputs=True,
                  precision="fp32", summary="FP32 ONNX export (optimum-onnx, merged decoder with KV cache), checked against PyTorch")
