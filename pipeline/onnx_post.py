"""What the runner adds to an ONNX artifact after its build: parity with the parent (and the stage's
limits on it), scoring against the reference, ``genai_config.json``, the model card, and the recorded
outputs others are checked against. An ONNX stage declares ``STAGE = OnnxStage(...)``; only those
stages import this module, so the data and checkpoint stages do not depend on the card, the genai
config or the parity check (pipeline/dvcgen.py: a stage's deps are its import closure)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel

from . import card
from .consumer import genai
from .errors import PipelineError
from .graph import onnx_io
from .log import info
from .runner import Inputs, Stage
from .scoring import evaluate, outputs
from .scoring import metrics as metric_table
from .scoring.evaluate import model_bytes


@dataclass(frozen=True)
class OnnxStage(Stage):
    require_greedy_match: bool = False           # parity: the greedy tokens must equal the parent's
    keep_outputs: bool = False                   # others are checked against it: keep its recorded outputs

    def check(self, tmp: Path, config: BaseModel, inputs: Inputs, scoring, scratch: Path, metrics: dict,
              extra: dict, measured: dict):
        onnx_io.copy_side_files(inputs.dir, tmp)
        # The graph check is onnxruntime loading it: fused graphs hold ORT-only ops
        # (SimplifiedLayerNormalization, com.microsoft.*) that onnx.checker does not know.
        info(f"{self.name}: built in {measured['build_seconds']:.1f} s; parity with {inputs.manifest['stage']} ...")
        result, scored, mine, timings = evaluate.check(tmp, self.name, inputs.dir, config.greedy_tokens, scoring,
                                                       scratch)
        measured.update(timings)
        self._enforce(config, result, inputs.manifest["stage"])
        metrics["parity_vs_parent"] = result
        if scored:
            metrics["eval"] = scored
        extra.setdefault("opset", onnx_io.opset(onnx_io.load(tmp, load_external_data=False)))
        genai.write(tmp)  # onnxruntime-genai runs every ONNX artifact as shipped
        return mine

    def seal(self, tmp: Path, manifest: dict) -> None:
        """Every ONNX artifact explains itself: README.md, a model card, listed (so hashed) in the manifest."""
        manifest["files"] = sorted([*manifest["files"], card.write(tmp, manifest, self.summary, self.precision)],
                                   key=lambda f: f["path"])
        manifest["size_bytes"] = sum(f["size"] for f in manifest["files"])

    def keep(self, checked, out: Path) -> None:
        if self.keep_outputs:
            outputs.keep(checked, out)

    def _enforce(self, config: BaseModel, result: dict, parent_stage: str) -> None:
        vs = "PyTorch" if parent_stage == "checkpoint" else parent_stage
        if self.require_greedy_match and not result["greedy_match"]:
            raise PipelineError(f"{self.name} parity failed: greedy tokens differ from {vs} (prefix match "
                                f"{result['greedy_prefix_match']:.0%}, max |dlogit| {result['max_abs_logit_delta']:.2e})")
        if self.require_greedy_match and result.get("batch_rows_prefix_match", 1.0) < 1.0:
            raise PipelineError(f"{self.name} parity failed: the prompts run as one mixed-length batch get other "
                                f"tokens than alone (prefix match {result['batch_rows_prefix_match']:.0%})")
        if self.require_greedy_match and result.get("decode_top1_agreement", 1.0) < 1.0:
            raise PipelineError(f"{self.name} parity failed: along the decode path (one token a step through the KV "
                                f"cache) the argmax differs from {vs} at {1 - result['decode_top1_agreement']:.1%} of "
                                f"{result['decode_positions']} positions")
        limit = getattr(config, "max_abs_logit_delta", None)
        for key, where in (("max_abs_logit_delta", "prefill"), ("decode_max_abs_logit_delta", "decode path")):
            if limit is not None and result.get(key, 0.0) > limit:
                raise PipelineError(f"{self.name} parity failed: max |dlogit| on the {where} {result[key]:.2e} > "
                                    f"{self.section}.max_abs_logit_delta {limit}")

    def closing_line(self, manifest: dict, out: Path, parent_dir: Path | None, measured: dict) -> str:
        """``int4: <id> 12.3 MB (0.160x fused), max |dlogit| vs fused ..., ppl ..., drift ..., 12.0 s``."""
        m = manifest["metrics"]
        parity, ev = m.get("parity_vs_parent", {}), m.get("eval")
        parent = manifest["lineage"][0]["stage"]
        size, parent_size = model_bytes(out), model_bytes(parent_dir)
        ratio = f" ({size / parent_size:.3f}x {parent})" if parent_size else f" {manifest.get('precision', '')}"
        line = (f"{manifest['stage']}: {manifest['artifact_id']} {size / 1e6:.1f} MB{ratio}, opset {manifest['opset']}, "
                f"max |dlogit| vs {parent} {parity['max_abs_logit_delta']:.2e}, greedy prefix match "
                f"{parity['greedy_prefix_match']:.0%}")
        if ev:
            line += f", vs {ev['reference']}: {metric_table.summary(ev)}"
        return line + f", {measured['wall_seconds']:.1f} s, peak RSS {measured['peak_rss_mb'] / 1024:.2f} GB"
