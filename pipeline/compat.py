"""Every workaround for a library we build on, in one place: what it works around, the upstream issue
where there is one, and the versions it was written against. :func:`guard` says so once per run when
the installed version is newer than the last one checked, so it is visible when a workaround can go.

Nothing here changes what a library computes: each patch only keeps a library from holding a second
copy of the weights, from reading a tensor it does not need, or from printing a line per node."""

from __future__ import annotations

import contextlib
import logging
from importlib import metadata

from .log import info

_warned: set[str] = set()


def _version(package: str) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in metadata.version(package).split("+")[0].split(".")[:3] if p.isdigit())
    except metadata.PackageNotFoundError:
        return ()


def guard(name: str, package: str, checked: str, issue: str) -> None:
    """Note once when ``package`` is newer than the last version (``checked``) the workaround ``name`` was
    checked against: the upstream fix (``issue``) may make it unnecessary."""
    newer = _version(package) > tuple(int(p) for p in checked.split("."))
    if newer and name not in _warned:
        _warned.add(name)
        info(f"note: compat workaround '{name}' was checked against {package} {checked}; installed "
             f"{metadata.version(package)}: see whether {issue} is fixed and pipeline/compat.py can drop it")


# ---------------------------------------------------------------------------------------------- optimum
@contextlib.contextmanager
def optimum_export_in_bounded_memory():
    """optimum-onnx 0.1.0's export holds a second copy of the weights twice (no upstream issue found):

    - it re-saves a model over 2 GB into one data file by loading every tensor while the PyTorch model is
      still alive: its check for external data answers no here, and ``onnx_io.save_ir`` streams the one
      data file tensor by tensor instead;
    - torch's ONNX shape inference allocates and frees weight-sized buffers; glibc's adaptive mmap
      threshold then serves them from the heap, which keeps what was freed (docs/real-shapes.md). A fixed
      threshold gives it back.

    Also silences optimum's logger and torch.jit's tracer warnings on every export."""
    import ctypes
    import io
    import warnings

    from optimum.exporters.onnx import convert

    guard("optimum external-data merge", "optimum-onnx", "0.1.0", "optimum's merge of external data in memory")
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD = 1 MiB
    except (OSError, AttributeError):
        pass  # not glibc: nothing to tune
    logging.getLogger("optimum").setLevel(logging.ERROR)
    check = convert.check_model_uses_external_data
    convert.check_model_uses_external_data = lambda model: False
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        convert.check_model_uses_external_data = check


@contextlib.contextmanager
def optimum_traces_a_skeleton(model):
    """optimum-onnx 0.1.0's ``main_export`` loads the checkpoint itself, as float32: at Qwen3-4B a 16 GB
    copy in anonymous memory, upcast from a bf16 checkpoint, that torch's exporter only traces and
    writes out. Its loader (``TasksManager.get_model_from_task``) is made to return ``model``, built by
    the caller without weights (``torch_ref.skeleton``); everything else in ``main_export`` (task,
    config, dummy inputs, side files) runs as written. No upstream option exists for this."""
    from optimum.exporters.tasks import TasksManager

    guard("optimum skeleton export", "optimum-onnx", "0.1.0", "main_export taking a model object")
    original = TasksManager.__dict__["get_model_from_task"]

    def given(*args, **kwargs):
        TasksManager.standardize_model_attributes(model, library_name=kwargs.get("library_name") or "transformers")
        return model

    TasksManager.get_model_from_task = staticmethod(given)
    try:
        yield
    finally:
        TasksManager.get_model_from_task = original


@contextlib.contextmanager
def torch_exports_no_params():
    """torch's TorchScript exporter (``torch.onnx.export``, which optimum calls with no way to pass
    ``export_params``) would write every skeleton parameter out at its full float32 size, only for the
    export stage to replace it. With ``export_params=False`` the parameters become graph inputs named
    by their state-dict names and no weight is written (a graph of a few MB, no data file);
    ``stages.export.put_weights`` turns them into initializers.

    Even then the exporter hands the parameters' values to its ONNX shape inference (twice), which
    makes a full copy of each broadcast parameter in C++, in memory and time the size of the model. The
    private ``_get_named_param_dict`` is made to return no values, so shape inference reads the
    parameters' traced shapes from the graph inputs: the same graph, byte for byte
    (test_the_skeleton_export_is_optimums_export_of_the_weights), in a fraction of the memory and time
    (docs/real-shapes.md).
    What is left is the traced forward's lm_head (one float32 copy of the table, transient)."""
    import functools

    import torch
    from torch.onnx._internal.torchscript_exporter import utils as exporter

    guard("torch export without params", "torch", "2.13.0", "optimum passing export_params through")
    original, named = torch.onnx.export, exporter._get_named_param_dict
    torch.onnx.export = functools.partial(original, export_params=False)
    exporter._get_named_param_dict = lambda graph, params: {}
    try:
        yield
    finally:
        torch.onnx.export, exporter._get_named_param_dict = original, named


def optimum_head_dim_fix(config: dict) -> list[str]:
    """optimum-onnx 0.1.0's ORTModelForCausalLM sizes the KV cache with hidden_size // heads; every real
    Qwen3 sets a larger head_dim (huggingface/optimum#2379): the model card's snippet sets it."""
    head_dim, hidden, heads = config.get("head_dim"), config.get("hidden_size"), config.get("num_attention_heads")
    if head_dim and hidden and heads and head_dim != hidden // heads:
        return ["model.embed_size_per_head = model.config.head_dim  # huggingface/optimum#2379"]
    return []


# ---------------------------------------------------------------------------------------------- onnxruntime
def _value_info(tensor):
    from onnx import helper

    return helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims))


@contextlib.contextmanager
def ort_float16_on_graph_alone():
    """ORT's float16 converter (onnxruntime.transformers.float16) calls ``make_value_info_from_tensor``,
    which reads a whole tensor to learn the shape its dims already give, and fails on an external one
    it has retyped: replaced by one that reads the dims. (No upstream issue found.)"""
    import sys
    from unittest import mock

    from onnxruntime.transformers import onnx_model  # noqa: F401  (imports float16 under that name)

    guard("ORT float16 value info", "onnxruntime", "1.32.0", "float16.make_value_info_from_tensor reading data")
    with mock.patch.object(sys.modules["float16"], "make_value_info_from_tensor", _value_info):
        yield sys.modules["float16"]


def _graph_only(path):
    """ORT's load_model_with_shape_infer, less the weights (they stay in the model's data file)."""
    import onnx
    from onnxruntime.quantization.quant_utils import add_infer_metadata

    model = onnx.shape_inference.infer_shapes(onnx.load(str(path), load_external_data=False))
    add_infer_metadata(model)
    return model


@contextlib.contextmanager
def ort_quantization_on_graph_alone():
    """ORT's calibrator and ``quantize_static`` load the model with its weights only to add outputs or
    read one initializer at a time; protobuf keeps those bytes while the session holds its own (2x and
    3x the weights). Loaded without them, the weights are read from the data file as needed.
    (No upstream issue found.)"""
    import importlib
    from unittest import mock

    from onnxruntime.quantization import calibrate

    ort_quantize = importlib.import_module("onnxruntime.quantization.quantize")  # the module, not the function
    guard("ORT quantization graph-only load", "onnxruntime", "1.32.0", "load_model_with_shape_infer loading weights")
    with mock.patch.object(calibrate, "load_model_with_shape_infer", _graph_only), \
            mock.patch.object(ort_quantize, "load_model_with_shape_infer", _graph_only):
        yield


@contextlib.contextmanager
def ort_calibrator_session_options(options):
    """ORT's calibrator (``CalibraterBase.create_inference_session``) builds its session with default
    options, so ORT packs every MatMul weight into an anonymous copy of its own, which with the
    activations collected made int8-static the largest stage at 4B (docs/real-shapes.md). The calibrator's session is
    given ``options`` (the runtime's, with prepacking off where the weights do not fit twice), keeping
    ORT's own choice of no graph optimizations. (No upstream option for it.)"""
    import onnxruntime as ort
    from onnxruntime.quantization import calibrate

    guard("ORT calibrator session options", "onnxruntime", "1.32.0", "create_calibrator taking session options")

    def create_inference_session(self):
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        self.infer_session = ort.InferenceSession(self.augmented_model_path, sess_options=options,
                                                  providers=self.execution_providers)

    original = calibrate.CalibraterBase.create_inference_session
    calibrate.CalibraterBase.create_inference_session = create_inference_session
    try:
        yield
    finally:
        calibrate.CalibraterBase.create_inference_session = original


def quiet_ort_quantizers() -> None:
    """ORT's quantizers log one INFO line per MatMul and advise "please pre-process" on every call through
    the root logger and a handler of their own."""
    logging.getLogger().setLevel(logging.ERROR)
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    logging.getLogger("onnxruntime.transformers").setLevel(logging.WARNING)


# ----------------------------------------------------------------------------- ORT k_quant (int4)
@contextlib.contextmanager
def unused_inputs_hidden(model):
    """ORT 1.32's k_quant path (``neural_compressor.weight_only.rtn_quantize``) sorts the graph
    topologically from its inputs and fails with ``KeyError: 'position_ids'`` on a graph input no node
    reads (the fused graph's GroupQueryAttention takes positions from the mask). Those inputs are
    removed while it runs and put back on ``model``; the context yields ``put_back(q)`` for the model
    the quantizer returns, which may be another object."""
    guard("k_quant unused graph inputs", "onnxruntime", "1.32.0", "neural_compressor onnx_model.topological_sort")
    read = {i for n in model.graph.node for i in n.input}
    inputs = list(model.graph.input)
    kept = [v for v in inputs if v.name in read]

    def put_back(q):
        del q.graph.input[:]
        q.graph.input.extend(inputs)
        return q

    del model.graph.input[:]
    model.graph.input.extend(kept)
    try:
        yield put_back
    finally:
        put_back(model)
