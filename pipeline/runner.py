"""The one stage runner. Every stage is one declaration (:class:`Stage`: its name, the stages its input
may come from, its config class and a ``build``) and this module owns the frame around the build:

    verify the parent -> build into a scratch dir -> the stage's checks -> manifest -> atomic publish

An ONNX stage (:class:`pipeline.onnx_post.OnnxStage`) adds its checks through the hooks below: parity
with the parent, scoring against the reference, genai_config.json and the model card. They live in their
own module, imported by the ONNX stages alone, so a stage that writes no ONNX (data, checkpoint) does not
depend on them: editing the model card re-runs the stages that write cards, not training.

Everything a stage writes into the artifact is a function of its inputs, so rebuilding gives the same
bytes; what a run measures (wall time, peak RSS, decode speed, the machine) comes back separately, as
:attr:`Published.run`, for ``metrics/build/`` (the CLI's ``--run-metrics``), never into the artifact."""

from __future__ import annotations

import gc
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel

from . import registry
from .consumer import manifest as mf
from .consumer.verify import verify
from .errors import PipelineError
from .graph import onnx_io
from .log import heartbeat, info
from .ops import memory, store
from .ops.child import peak_rss_mb


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
    """One stage, declared once (``STAGE = Stage(...)`` in ``stages/<module>.py``): the CLI verb,
    dvc.yaml, the supervisor and tune read it. The fields marked *literal* are read from the source
    by pipeline/registry.py and must be written as literals."""
    name: str                                    # literal
    config: type[BaseModel]
    build: Callable[[Inputs, Any, Path], BuildResult]
    verb: str = ""                               # literal: `pipeline <verb>` (default: the name)
    mode: str | None = None                      # literal: `pipeline <verb> --mode <mode>`
    flags: dict = field(default_factory=dict)    # literal: CLI flag -> (params key[, help[, negative flag]])
    parents: tuple[str, ...] = ()                # literal: stages its input may come from; () = no input
    uses: tuple[str, ...] = ()                   # literal: other artifacts it may read (--<name> DIR, a DVC dep)
    default_parent: str | None = None            # literal: the input dvc.yaml gives it (default: parents[0];
                                                 # a config with a ``parent`` field names it there)
    precision: str = ""                          # literal: an ONNX artifact's precision: fp32 | fp16 | int8 | int4
    reference: str = "export"                    # literal: what an ONNX artifact is scored against
    tunable: tuple[str, ...] = ()                # literal: `pipeline tune` may search these keys of its section
    section: str | None = None                   # its params section; None: the config's fields name sections
    summary: str = ""                            # what the artifact is, in one line (model card, DVC registry)
    metrics: Callable[[dict], dict] | None = None  # its metrics file (--metrics), from its manifest
    describe: Callable[[dict, dict], str] | None = None  # its closing line

    # Hooks around the build (pipeline/onnx_post.py's OnnxStage fills them for ONNX artifacts).
    def check(self, tmp: Path, config: BaseModel, inputs: Inputs, scoring, scratch: Path, metrics: dict,
              extra: dict, measured: dict):
        """After the build, before the manifest: check the files in ``tmp``, add figures to ``metrics``,
        manifest fields to ``extra`` and run figures to ``measured``; what it returns goes to :meth:`keep`."""
        return None

    def seal(self, tmp: Path, manifest: dict) -> None:
        """Write the files that describe the manifest (and list them in it) before it is published."""

    def keep(self, checked, out: Path) -> None:
        """After the publish: keep what :meth:`check` returned beside the artifact."""

    def closing_line(self, manifest: dict, out: Path, parent_dir: Path | None, measured: dict) -> str:
        if self.describe:
            return self.describe(manifest, measured)
        return (f"{self.name}: {manifest['artifact_id']} {manifest['size_bytes'] / 1e6:.1f} MB, "
                f"{measured['wall_seconds']:.1f} s, peak RSS {measured['peak_rss_mb'] / 1024:.2f} GB")


def config_of(stage: Stage, params) -> BaseModel:
    """The stage's typed config, taken from the checked params."""
    if stage.section:
        return getattr(params, stage.section)
    return stage.config.model_validate({f: getattr(params, f) for f in stage.config.model_fields})


def default_input(stage: Stage, config: BaseModel) -> str | None:
    """The stage its input comes from unless told otherwise: the config's ``parent`` where it has one
    (params.yaml picks it), else the declared default."""
    if not stage.parents:
        return None
    return getattr(config, "parent", None) or stage.default_parent or stage.parents[0]


@dataclass(frozen=True)
class Published:
    """What `pipeline <verb>` made: the published artifact's manifest and this run's figures (beside the
    stage's own :class:`BuildResult`)."""
    manifest: dict
    run: dict


def run_stage(name: str, params, parent_dir: str | Path | None, out: str | Path,
              scoring=None, uses: dict | None = None) -> Published:
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
        scoring=None, uses: dict | None = None) -> Published:
    """``scoring``: what an ONNX artifact is scored against when built (pipeline.scoring.evaluate.Scoring)."""
    t0 = time.perf_counter()
    parent = None
    if stage.parents:
        if parent_dir is None:
            raise PipelineError(f"{stage.name} needs an input artifact ({' or '.join(stage.parents)})")
        parent_dir = Path(parent_dir)
        parent = verify(parent_dir, load=False)
        mf.expect_stage(parent, stage.parents, parent_dir)
    used = _verified_uses(stage, uses)
    memory.tell_supervisor(stage=stage.name, out=str(Path(out).resolve()))
    _room_for(stage, parent, Path(out))
    if parent_dir is not None and (parent_dir / "config.json").is_file():
        memory.check(stage.name, json.loads((parent_dir / "config.json").read_text()))
    measured: dict = {}
    with store.staging_dir(out) as tmp, store.scratch_dir(tmp, "outputs") as scratch:
        # Under the output's lock: a concurrent run on the same output links the parent's weights into its
        # scratch, which would read here as a DVC hard link instead of the lock's one-line refusal.
        if parent_dir is not None:
            _loadable_by_onnx(parent_dir, Path(out).parent)
        with heartbeat(stage.name):
            made = stage.build(Inputs(parent_dir, parent, used), config, tmp)
        gc.collect()  # the build's graph and weights are gone before any model is loaded
        measured["build_seconds"] = round(time.perf_counter() - t0, 2)
        measured.update(made.run)
        metrics, extra = dict(made.metrics), dict(made.extra)
        checked = stage.check(tmp, config, Inputs(parent_dir, parent, used), scoring, Path(scratch), metrics, extra,
                              measured)
        params = made.params if made.params is not None else config.model_dump(mode="json")
        manifest = mf.build_manifest(tmp, stage=stage.name, params=params, parent=parent,
                                     source=made.source if made.source is not None else parent["source"],
                                     metrics=metrics, extra=extra)
        stage.seal(tmp, manifest)
        store.publish(tmp, out, manifest)
        stage.keep(checked, Path(out))
    measured["wall_seconds"] = round(time.perf_counter() - t0, 2)
    measured["peak_rss_mb"] = max(peak_rss_mb(), measured.get("child_peak_rss_mb", 0))
    info(stage.closing_line(manifest, Path(out), parent_dir, measured))
    return Published(manifest, measured)


def _room_for(stage: Stage, parent: dict | None, out: Path) -> None:
    """One line before the build, not ENOSPC halfway through it: the artifact and its scratch are written
    beside ``out``. No stage writes more than its parent's size (weights at the parent's precision or
    below) except the export, which may widen a bf16 checkpoint to fp32: twice."""
    import shutil

    if parent is None:
        return
    need = parent["size_bytes"] * (2 if stage.name == "export" else 1)
    where = out.parent if out.parent.exists() else Path(".")
    free = shutil.disk_usage(where).free
    if need > free:
        raise PipelineError(f"{stage.name} needs about {need / 1e9:.2f} GB at {where.resolve()} and {free / 1e9:.2f} GB "
                            f"is free: free some space or write the artifact (--out) to a larger disk")


def _loadable_by_onnx(parent_dir: Path, out_parent: Path) -> None:
    """onnx (1.23) and onnx-ir (1.1) refuse external data that has several hard links or resolves outside
    the model's directory, and every stage loads its parent through them: say so in one line, before the
    build, instead of a library's error halfway through (DVC's hardlink / symlink cache types do this).
    Links that our own runs' scratch folders hold (onnx_io.beside_weights, another stage reading the same
    parent) are not DVC's: they are counted out."""
    data = parent_dir / onnx_io.DATA
    if data.is_symlink():
        how = "a symlink"
    elif data.is_file() and data.stat().st_nlink > 1 + _scratch_links(data, {parent_dir.parent, out_parent}):
        how = f"a file with {data.stat().st_nlink} hard links"
    else:
        return
    raise PipelineError(f"{data} is {how} (DVC cache.type hardlink or symlink?): onnx refuses to load such "
                        f"external data. Use cache.type reflink,copy (this repo's .dvc/config) and run "
                        f"`dvc checkout --relink`")


def _scratch_links(data: Path, folders: set[Path]) -> int:
    st = data.stat()
    found = 0
    for folder in folders:
        for scratch in folder.glob(".*.tmp-*"):
            for other in scratch.rglob(onnx_io.DATA):
                try:
                    o = other.lstat()
                except OSError:
                    continue
                found += (o.st_ino, o.st_dev) == (st.st_ino, st.st_dev)
    return found
