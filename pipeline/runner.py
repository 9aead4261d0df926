"""The one stage runner. Every stage is one declaration (:class:`Stage`: its name, the stages its input
may come from, its config class and a ``build``) and this module owns the frame around the build:

    verify the parent -> build into a scratch dir -> (ONNX) parity with the parent and scoring against
    the reference -> genai_config.json and the model card -> manifest -> atomic publish

Everything a stage writes into the artifact is a function of its inputs, so rebuilding gives the same
bytes; what a run measures (wall time, peak RSS, decode speed, the machine) comes back separately, as
:attr:`Built.run`, for ``metrics/build/`` (the CLI's ``--run-metrics``), never into the artifact."""

from __future__ import annotations

import gc
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel

from . import card, evaluate, genai, memory, onnx_io, outputs, registry, store
from . import manifest as mf
from .child import peak_rss_mb
from .errors import PipelineError
from .evaluate import Scoring, model_bytes
from .log import heartbeat, info
from .verify import verify


@dataclass(frozen=True)
class BuildResult:
    """What a build returns, beside the files it wrote."""
    metrics: dict = field(default_factory=dict)  # the artifact's own figures (op counts, ...): in the manifest
    extra: dict = field(default_factory=dict)    # manifest fields (precision, kv_dtype, policies)
    run: dict = field(default_factory=dict)      # this run's measurements (child peak RSS, ...): never in the artifact
    source: dict | None = None                   # where the model comes from (default: the parent's)
    params: dict | None = None                   # what the id covers, where that is less than the whole config


@dataclass(frozen=True)
class Inputs:
    """The build's input: the parent artifact (verified) or nothing (the first stage), and the other
    artifacts it reads (``Stage.uses``, verified), by stage name: (dir, manifest)."""
    dir: Path | None
    manifest: dict | None
    uses: dict = field(default_factory=dict)

    def use(self, name: str, why: str) -> tuple[Path, dict]:
        """The artifact ``name`` the build needs for ``why``; one clear error when it was not given."""
        if name not in self.uses:
            raise PipelineError(f"{why} needs the {name} artifact: build it first (pipeline {name}) and pass "
                                f"--{name} DIR")
        return self.uses[name]


@dataclass(frozen=True)
class Stage:
    name: str
    config: type[BaseModel]
    build: Callable[[Inputs, Any, Path], BuildResult]
    parents: tuple[str, ...] = ()                # stages its input may come from; () = no input artifact
    uses: tuple[str, ...] = ()                   # other artifacts it may read (CLI --<name> DIR, a DVC dep)
    default_parent: str | None = None            # the input dvc.yaml gives it (default: parents[0]; a config
                                                 # with a ``parent`` field names it there)
    section: str | None = None                   # its params section; None: the config's fields name sections
    summary: str = ""                            # what the artifact is, in one line (model card, DVC registry)
    precision: str = ""                          # an ONNX artifact's precision tag: fp32 | fp16 | int8 | int4
    require_greedy_match: bool = False           # parity: the greedy tokens must equal the parent's
    keep_outputs: bool = False                   # others are checked against it: keep its recorded outputs
    describe: Callable[[dict, dict], str] | None = None  # the closing line, for stages that are not ONNX


def config_of(stage: Stage, params) -> BaseModel:
    """The stage's typed config, taken from the checked params."""
    if stage.section:
        return getattr(params, stage.section)
    return stage.config.model_validate({f: getattr(params, f) for f in stage.config.model_fields})


@dataclass(frozen=True)
class Built:
    manifest: dict
    run: dict


def run_stage(name: str, params, parent_dir: str | Path | None, out: str | Path,
              scoring: Scoring | None = None, uses: dict | None = None) -> Built:
    """Build the registered stage ``name`` with its section of the checked ``params``: what every
    `pipeline <verb>` runs."""
    stage = registry.load(name)
    return run(stage, config_of(stage, params), parent_dir, out, scoring, uses)


def _verified_uses(stage: Stage, uses: dict | None) -> dict:
    found = {}
    for name, directory in (uses or {}).items():
        if name not in stage.uses:
            raise PipelineError(f"{stage.name} reads no {name} artifact (it reads: {', '.join(stage.uses) or 'none'})")
        if directory is None:
            continue
        directory = Path(directory)
        if not directory.exists():
            continue  # absent: the build says whether it needed it
        manifest = verify(directory, load=False)
        mf.expect_stage(manifest, (name,), directory)
        found[name] = (directory, manifest)
    return found


def run(stage: Stage, config: BaseModel, parent_dir: str | Path | None, out: str | Path,
        scoring: Scoring | None = None, uses: dict | None = None) -> Built:
    t0 = time.perf_counter()
    parent = None
    if stage.parents:
        if parent_dir is None:
            raise PipelineError(f"{stage.name} needs an input artifact ({' or '.join(stage.parents)})")
        parent_dir = Path(parent_dir)
        parent = verify(parent_dir, load=False)
        mf.expect_stage(parent, stage.parents, parent_dir)
        _loadable_by_onnx(parent_dir)
    used = _verified_uses(stage, uses)
    memory.tell_supervisor(stage=stage.name, out=str(Path(out).resolve()))
    if parent_dir is not None and (parent_dir / "config.json").is_file():
        memory.check(stage.name, json.loads((parent_dir / "config.json").read_text()))
    measured: dict = {}
    with store.staging_dir(out) as tmp, store.scratch_dir(tmp, "outputs") as scratch:
        with heartbeat(stage.name):
            made = stage.build(Inputs(parent_dir, parent, used), config, tmp)
        gc.collect()  # the build's graph and weights are gone before any model is loaded
        measured["build_seconds"] = round(time.perf_counter() - t0, 2)
        measured.update(made.run)
        metrics, extra = dict(made.metrics), dict(made.extra)
        is_onnx = (tmp / onnx_io.MODEL).is_file()
        mine = {}
        if is_onnx:
            onnx_io.copy_side_files(parent_dir, tmp)
            # The graph check is onnxruntime loading it: fused graphs hold ORT-only ops
            # (SimplifiedLayerNormalization, com.microsoft.*) that onnx.checker does not know.
            info(f"{stage.name}: built in {measured['build_seconds']:.1f} s; parity with {parent['stage']} ...")
            result, scored, mine, timings = evaluate.check(tmp, stage.name, parent_dir, config.greedy_tokens, scoring,
                                                           Path(scratch))
            measured.update(timings)
            _enforce(stage, config, result, parent["stage"])
            metrics["parity_vs_parent"] = result
            if scored:
                metrics["eval"] = scored
            extra.setdefault("opset", onnx_io.opset(onnx_io.load(tmp, load_external_data=False)))
            genai.write(tmp)  # onnxruntime-genai runs every ONNX artifact as shipped
        params = made.params if made.params is not None else config.model_dump(mode="json")
        manifest = mf.build_manifest(tmp, stage=stage.name, params=params, parent=parent,
                                     source=made.source if made.source is not None else parent["source"],
                                     metrics=metrics, extra=extra)
        if is_onnx:  # every ONNX artifact explains itself: README.md, a model card
            manifest["files"] = sorted([*manifest["files"], card.write(tmp, manifest, stage.summary, stage.precision)],
                                       key=lambda f: f["path"])
            manifest["size_bytes"] = sum(f["size"] for f in manifest["files"])
        store.publish(tmp, out, manifest)
        if stage.keep_outputs:
            outputs.keep(mine, out)
    measured["wall_seconds"] = round(time.perf_counter() - t0, 2)
    measured["peak_rss_mb"] = max(peak_rss_mb(), measured.get("child_peak_rss_mb", 0))
    built = Built(manifest, measured)
    info(stage.describe(manifest, measured) if stage.describe else summary_line(manifest, Path(out), parent_dir,
                                                                                 measured))
    return built


def _loadable_by_onnx(parent_dir: Path) -> None:
    """onnx (1.23) and onnx-ir (1.1) refuse external data that has several hard links or resolves outside
    the model's directory, and every stage loads its parent through them: say so in one line, before the
    build, instead of a library's error halfway through (DVC's hardlink / symlink cache types do this)."""
    data = parent_dir / onnx_io.DATA
    if data.is_symlink() or (data.is_file() and data.stat().st_nlink > 1):
        how = "a symlink" if data.is_symlink() else f"a file with {data.stat().st_nlink} hard links"
        raise PipelineError(f"{data} is {how} (DVC cache.type hardlink or symlink?): onnx refuses to load such "
                            f"external data. Use cache.type reflink,copy (this repo's .dvc/config) and run "
                            f"`dvc checkout --relink`")


def _enforce(stage: Stage, config: BaseModel, result: dict, parent_stage: str) -> None:
    vs = "PyTorch" if parent_stage == "checkpoint" else parent_stage
    if stage.require_greedy_match and not result["greedy_match"]:
        raise PipelineError(f"{stage.name} parity failed: greedy tokens differ from {vs} (prefix match "
                            f"{result['greedy_prefix_match']:.0%}, max |dlogit| {result['max_abs_logit_delta']:.2e})")
    if stage.require_greedy_match and result.get("batch_rows_prefix_match", 1.0) < 1.0:
        raise PipelineError(f"{stage.name} parity failed: the prompts run as one mixed-length batch get other tokens "
                            f"than alone (prefix match {result['batch_rows_prefix_match']:.0%})")
    if stage.require_greedy_match and result.get("decode_top1_agreement", 1.0) < 1.0:
        raise PipelineError(f"{stage.name} parity failed: along the decode path (one token a step through the KV "
                            f"cache) the argmax differs from {vs} at {1 - result['decode_top1_agreement']:.1%} of "
                            f"{result['decode_positions']} positions")
    limit = getattr(config, "max_abs_logit_delta", None)
    for key, where in (("max_abs_logit_delta", "prefill"), ("decode_max_abs_logit_delta", "decode path")):
        if limit is not None and result.get(key, 0.0) > limit:
            raise PipelineError(f"{stage.name} parity failed: max |dlogit| on the {where} {result[key]:.2e} > "
                                f"{stage.section}.max_abs_logit_delta {limit}")


def summary_line(manifest: dict, out: Path, parent_dir: Path, measured: dict) -> str:
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
        line += (f", ppl {ev['ppl']:.3f}, drift {ev['drift_pct']:+.3f} % vs {ev['reference']}, KLD {ev['kld_mean']:.2e}, "
                 f"top-1 {ev['top1_agreement']:.2%}")
    return line + f", {measured['wall_seconds']:.1f} s, peak RSS {measured['peak_rss_mb'] / 1024:.2f} GB"
