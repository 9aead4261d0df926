"""Stage `imatrix`: the importance matrix of the parent graph on calibration text (pipeline/quant/imatrix.py):
per projection input channel, mean x^2 and max |x|, and the KV cache's max |x| per layer. Read by int4 (``algorithm: imatrix | awq``) and
int8-dynamic (``smoothing``); built once, versioned and cached like any artifact."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pipeline.graph import onnx_io
from pipeline.graph.tied import find_tied
from pipeline.ops import store
from pipeline.quant import imatrix
from pipeline.quant.smoothquant import projection_groups
from pipeline.runner import BuildResult, Inputs, Stage
from pipeline.schema import Section
from pipeline.text.reader import TextWindows, calibration_windows, covered_params


class Imatrix(Section):
    """The importance matrix: per projection input channel, mean x^2 and max |x| over calibration text."""
    parent: Literal["export", "fused"]
    calibration: TextWindows



def build(inputs: Inputs, config: Imatrix, tmp: Path) -> BuildResult:
    parent_dir = inputs.dir
    cal = config.calibration
    model_config = json.loads((parent_dir / "config.json").read_text())
    eos = model_config.get("eos_token_id")
    windows = calibration_windows(cal.source, cal.text_column, parent_dir / "tokenizer.json", cal.samples,
                                  cal.seq_len, eos if isinstance(eos, int) else None)
    graph = onnx_io.load(parent_dir, load_external_data=False)
    heads = set(onnx_io.lm_head_nodes(graph))
    groups = {x: [m.input[1] for m in members] for x, members in projection_groups(graph, heads).items()}
    tensors = list(groups)
    tied = find_tied(graph)
    if tied is not None:  # the lm_head's input weighs the shared table's rounding (pipeline/graph/tied.py)
        gather, head, table = tied
        tensors.append(head.input[0])
        groups[head.input[0]] = [table]
    # the KV cache's range too, per layer: an int8 KV cache takes its scales from it (int4.kv_cache)
    tensors += [o.name for o in graph.graph.output if o.name.startswith(imatrix.KV_PREFIX)]
    with store.scratch_dir(tmp, "imatrix") as scratch:
        stats = imatrix.channel_statistics(graph, parent_dir.resolve(), tensors, model_config, windows,
                                           Path(scratch), "imatrix")
    summary = imatrix.save(tmp, stats, groups, windows, cal.round_bits)
    summary.update({"source": cal.source, "windows": len(windows), "seq_len": int(windows.shape[1]),
                    "round_bits": cal.round_bits})
    return BuildResult(metrics=summary, extra={"precision": "statistics"}, params=covered_params(config, windows))


def describe(manifest: dict, measured: dict) -> str:
    m = manifest["metrics"]
    return (f"imatrix: {manifest['artifact_id']} {m['activations']} activations feeding {m['projections']} projections, "
            f"{m['tokens']} tokens from {m['source']}, largest channel {m['max_outlier_ratio']}x the median "
            f"(median over activations {m['median_outlier_ratio']}x), {measured['wall_seconds']:.1f} s, "
            f"peak RSS {measured['peak_rss_mb'] / 1024:.2f} GB")


STAGE = Stage(name="imatrix", section="imatrix", config=Imatrix, build=build, parents=("export", "fused"),
              describe=describe, summary="importance matrix: per projection input channel, mean x^2 and max |x| "
                                         "on calibration text")
