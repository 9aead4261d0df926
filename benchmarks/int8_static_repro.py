"""Does int8-static give the same artifact when ORT computes its statistics on another code path?

ORT's MLAS chooses kernels from the CPU with no switch, so a second CPU is stood in for by other code
paths on this one:

- ``threads-and-fusions``: the calibrator's session with every graph optimization on (fused kernels;
  the calibrator ships with them off) and one intra-op thread, the SmoothQuant statistics' session
  with optimizations off and one thread;
- ``--other-python PY``: another interpreter, e.g. a venv holding another onnxruntime release (other
  MLAS kernels; its quantization tool is its own too, so weight scales may differ for that reason).

Each path builds int8-static from artifacts/fused with ``calibration.round_bits`` 0 (statistics as ORT
computed them) and 4 (the default); the activation (QuantizeLinear) scales and the artifact ids are
compared.

    python benchmarks/int8_static_repro.py [--other-python /tmp/ort122/bin/python]
    (after `dvc repro`; writes benchmarks/int8_static_repro.json)
"""

from __future__ import annotations

import contextlib
import json
import sys
import tempfile
from pathlib import Path
from unittest import mock

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.consumer import runtime  # noqa: E402
from pipeline.graph import onnx_io
from pipeline.params import load_params  # noqa: E402
from pipeline.runner import run_stage  # noqa: E402


@contextlib.contextmanager
def other_code_path():
    import onnxruntime as ort
    from onnxruntime.quantization import calibrate

    def calibrator_session(self):
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.intra_op_num_threads = 1
        self.infer_session = ort.InferenceSession(self.augmented_model_path, sess_options=so,
                                                  providers=self.execution_providers)

    plain = runtime.session_options

    def our_session(threads=None):
        so = plain(1)
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        return so

    with mock.patch.object(calibrate.CalibraterBase, "create_inference_session", calibrator_session), \
            mock.patch.object(runtime, "session_options", our_session):
        yield


def build(out: Path, path: str) -> dict:
    """Build int8-static at round_bits 0 and 4 into ``out``; return their ids and activation scales."""
    import onnxruntime as ort

    result = {"onnxruntime": ort.__version__}
    for bits in (0, 4):
        params = load_params("params.yaml", values={"int8_static.calibration.round_bits": bits})
        ctx = other_code_path if path == "threads-and-fusions" else contextlib.nullcontext
        with ctx():
            manifest = run_stage("int8-static", params, "artifacts/fused", out / str(bits)).manifest
        result[bits] = {"id": manifest["artifact_id"],
                        "scales": {k: v.tolist() for k, v in activation_scales(out / str(bits)).items()}}
    return result


def activation_scales(directory: Path) -> dict[str, np.ndarray]:
    """The scales of every QuantizeLinear (the activations': weights are stored quantized)."""
    from onnx import numpy_helper

    model = onnx_io.load(directory)
    inits = {t.name: t for t in model.graph.initializer}
    names = {n.input[1] for n in model.graph.node if n.op_type == "QuantizeLinear"}
    return {n: numpy_helper.to_array(inits[n]) for n in sorted(names) if n in inits}


def compare(a: dict, b: dict) -> dict:
    rows = {}
    for bits in (0, 4):
        sa, sb = a[bits]["scales"], b[bits]["scales"]
        differ = [n for n in sa if n not in sb or sa[n] != sb[n]]
        rel = max((abs(np.asarray(sa[n]) - np.asarray(sb.get(n, 0))).max() / abs(np.asarray(sa[n])).max()
                   for n in differ), default=0.0)
        rows[f"round_bits {bits}"] = {"activation_scales": len(sa), "differing": len(differ),
                                      "max_relative_difference": float(rel), "ids": [a[bits]["id"], b[bits]["id"]],
                                      "same_artifact": a[bits]["id"] == b[bits]["id"]}
    return rows


def main() -> None:
    import argparse
    import subprocess

    ap = argparse.ArgumentParser()
    ap.add_argument("--other-python", default=None, help="an interpreter with another onnxruntime")
    ap.add_argument("--build", nargs=2, metavar=("OUT", "PATH"), help=argparse.SUPPRESS)  # worker
    args = ap.parse_args()
    if args.build:
        print(json.dumps(build(Path(args.build[0]), args.build[1])))
        return
    doc = {}
    with tempfile.TemporaryDirectory() as tmp:
        shipped = build(Path(tmp) / "shipped", "shipped")
        others = {"threads-and-fusions": build(Path(tmp) / "other", "threads-and-fusions")}
        if args.other_python:
            proc = subprocess.run([args.other_python, __file__, "--build", str(Path(tmp) / "py"), "shipped"],
                                  capture_output=True, text=True, check=True)
            others[f"onnxruntime {json.loads(proc.stdout.splitlines()[-1])['onnxruntime']}"] = \
                json.loads(proc.stdout.splitlines()[-1])
    for name, other in others.items():
        other = {int(k) if str(k).isdigit() else k: v for k, v in other.items()}  # JSON keys are strings
        doc[name] = {"shipped_onnxruntime": shipped["onnxruntime"], "other_onnxruntime": other["onnxruntime"],
                     **compare(shipped, other)}
        for bits in (0, 4):
            r = doc[name][f"round_bits {bits}"]
            print(f"{name}, round_bits {bits}: {r['differing']} of {r['activation_scales']} activation scales differ "
                  f"(max relative {r['max_relative_difference']:.2e}); same artifact: {r['same_artifact']}",
                  file=sys.stderr, flush=True)
    Path("benchmarks/int8_static_repro.json").write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
