"""The importance matrix: for every projection MatMul's input activation, per channel, the mean of x^2
and the max |x| over the calibration tokens (what llama.cpp's ``imatrix`` tool collects, here from the
ONNX graph itself, one window at a time).

It is stored as its own artifact (stage ``imatrix``: ``imatrix.safetensors`` + manifest), so that every
quantizer that reads it uses the same statistics, and collecting them is paid once:

- ``mean_sq`` weighs each input channel's rounding error by the energy it carries (pipeline/quant/nbits.py,
  the int4 ``imatrix`` and ``awq`` algorithms);
- ``max`` is SmoothQuant's per-channel maximum (int8-dynamic's ``smoothing``).

Keys are the activation tensors' names in the parent graph: a consumer must be built on the same
parent artifact (checked by :func:`load`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pipeline.consumer.runtime import GraphIO, make_session
from pipeline.errors import PipelineError
from pipeline.graph import onnx_io
from pipeline.log import Progress

FILE = "imatrix.safetensors"
KV_PREFIX = "present."  # the KV cache's outputs: their maxima give an int8 KV cache its scales
WINDOWS = "tokens"  # the calibration windows' token ids (no activation's key lacks a ".kind" suffix)


def channel_statistics(graph, weights_dir: Path, tensors: list[str], config: dict, windows: np.ndarray,
                       work: Path, label: str = "channel statistics",
                       outer: bool = False) -> dict[str, dict[str, np.ndarray]]:
    """Per channel of each of ``tensors``: running max |x| and sum of x^2 (float64) over ``windows``,
    with bounded memory (one window's activations at a time); ``outer``: instead, the sum of x x^T
    (float32, channels x channels: GPTQ's Hessian, pipeline/quant/gptq.py). ``graph``: the model loaded
    without its weights from ``weights_dir`` (they are linked, not loaded)."""
    from onnx import TensorProto, helper

    aug = type(graph)()
    aug.CopyFrom(graph)
    have = {o.name for o in aug.graph.output}
    for name in tensors:
        if name not in have:
            aug.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    path = onnx_io.beside_weights(aug, weights_dir, work)
    session = make_session(path, prepack=False)  # as int8-static's calibrator: statistics independent of free memory
    io = GraphIO.from_onnx(path, config)
    stats: dict[str, dict[str, np.ndarray]] = {}
    progress = Progress(label, len(windows))
    for i, win in enumerate(windows):
        for name, value in zip(tensors, session.run(tensors, io.feeds(win[None]))):
            x = value.reshape(-1, value.shape[-1])
            if outer:
                xtx = x.T @ x
                if name in stats:
                    stats[name]["xtx"] += xtx
                else:
                    stats[name] = {"xtx": xtx}
                continue
            m, sq = np.abs(x).max(axis=0), np.square(x, dtype=np.float64).sum(axis=0)
            if name not in stats:
                stats[name] = {"max": m, "sumsq": sq}
            else:
                stats[name]["max"] = np.maximum(stats[name]["max"], m)
                stats[name]["sumsq"] += sq
        progress.update(i + 1)
    del session
    return stats


def save(directory: Path, stats: dict, groups: dict[str, list[str]], windows: np.ndarray, round_bits: int) -> dict:
    """Write ``imatrix.safetensors``: ``<tensor>.mean_sq`` and ``<tensor>.max`` per activation, the
    projections each one feeds in the metadata, and the calibration token ``windows`` themselves (``tokens``:
    a consumer that needs more than these statistics, GPTQ's Hessians, computes them on the same text). Values
    rounded to ``round_bits`` mantissa bits (maxima outward), so another CPU's last bits give the same file."""
    from safetensors.numpy import save_file

    from pipeline.quant.rounding import outward

    tokens = int(windows.size)
    arrays = {WINDOWS: np.ascontiguousarray(windows, dtype=np.int64)}
    for name in sorted(stats):
        mean_sq = (stats[name]["sumsq"] / tokens).astype(np.float32)
        arrays[f"{name}.mean_sq"] = outward(mean_sq, round_bits, up=True)
        arrays[f"{name}.max"] = outward(stats[name]["max"].astype(np.float32), round_bits, up=True)
    # one metadata entry: safetensors writes its metadata map in hash order, so two keys can swap places
    # from one run to the next (measured: another file, another artifact id, one run in two)
    meta = {"imatrix": json.dumps({"groups": {k: groups[k] for k in sorted(groups)}, "tokens": tokens},
                                  sort_keys=True)}
    save_file(arrays, str(directory / FILE), metadata=meta)
    ratios = [float(s["max"].max() / max(np.median(s["max"]), 1e-12)) for n, s in stats.items()
              if not n.startswith(KV_PREFIX)]
    return {"activations": len(ratios), "projections": sum(len(v) for v in groups.values()), "tokens": tokens,
            "max_outlier_ratio": round(max(ratios), 1) if ratios else None,
            "median_outlier_ratio": round(float(np.median(ratios)), 1) if ratios else None}


class Imatrix:
    """A loaded importance matrix: ``mean_sq[x]``, ``max[x]`` per activation, ``groups[x]`` its projections."""

    def __init__(self, directory: Path):
        from safetensors import safe_open

        path = Path(directory) / FILE
        if not path.is_file():
            raise PipelineError(f"{directory} holds no {FILE}: not an imatrix artifact (pipeline imatrix)")
        self.mean_sq, self.max = {}, {}
        self.windows: np.ndarray | None = None  # None: made before the windows were kept
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata()
            for key in f.keys():
                if key == WINDOWS:
                    self.windows = f.get_tensor(key)
                    continue
                name, _, kind = key.rpartition(".")
                (self.mean_sq if kind == "mean_sq" else self.max)[name] = f.get_tensor(key)
        meta = json.loads(meta["imatrix"])
        self.groups: dict[str, list[str]] = meta["groups"]
        self.tokens = int(meta["tokens"])

    def kv_amax(self) -> dict[str, float]:
        """``present.<layer>.key|value`` -> max |x| over the calibration text (empty for an older imatrix)."""
        return {n: float(m.max()) for n, m in self.max.items() if n.startswith(KV_PREFIX)}

    def by_weight(self) -> dict[str, np.ndarray]:
        """Per projection weight name: the mean x^2 of its input channels."""
        return {w: self.mean_sq[x] for x, ws in self.groups.items() for w in ws}


def load(directory: Path, manifest: dict, parent: dict) -> Imatrix:
    """The imatrix artifact at ``directory``, checked to be collected on ``parent`` (the consumer's input)."""
    made_on = (manifest.get("lineage") or [{}])[0]
    if manifest.get("parent_id") != parent["artifact_id"]:
        raise PipelineError(f"the imatrix at {directory} was collected on {made_on.get('stage')} "
                            f"{manifest.get('parent_id')}, not on this input ({parent['stage']} "
                            f"{parent['artifact_id']}): rebuild it with pipeline imatrix --input <this input>")
    return Imatrix(directory)


def with_kv_cache(inputs, kv_cache: str, tmp: Path, made, section: str):
    """``<section>.kv_cache: int8``: the built graph's KV cache made int8 (pipeline/graph/fusions.py
    ``int8_kv_artifact``), with the imatrix's KV maxima as scales; ``made`` (the stage's BuildResult)
    gets the KV dtype and policy. ``float32`` returns ``made`` as it is."""
    if kv_cache != "int8":
        return made
    from pipeline.graph.fusions import int8_kv_artifact

    im_dir, im_manifest = inputs.use("imatrix", f"{section}.kv_cache int8")
    amax = load(im_dir, im_manifest, inputs.manifest).kv_amax()
    if not amax:
        raise PipelineError(f"the imatrix at {im_dir} holds no KV-cache maxima (made by an older pipeline): rebuild it")
    policy = int8_kv_artifact(tmp, amax)
    if not policy["attention_nodes"]:
        raise PipelineError(f"{section}.kv_cache int8 needs GroupQueryAttention (ORT's quantized KV cache): "
                            f"build it on the fused artifact ({section}.parent: fused)")
    made.extra["kv_dtype"] = "int8"
    made.extra.setdefault("quant_policy", {})["kv_cache"] = f"int8, {policy['scales']}"
    made.extra.setdefault("uses", {})["imatrix"] = im_manifest["artifact_id"]
    return made
