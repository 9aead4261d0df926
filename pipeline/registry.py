"""The stages, found in the ``stages`` package: every module there that declares ``STAGE = Stage(...)``
(:class:`pipeline.runner.Stage`) is a stage. There is no list to keep: adding a stage is adding its file
(and its params.yaml section). The schema, the runner, the CLI, dvc.yaml (``pipeline dvc-yaml``), the
supervisor, tune, the benchmarks and the tests all read the stages from here.

The index below (name, verb, parents, precision, ...) is *read* from the declarations' source, not
imported: a verb must execute its own stage's code and nothing else, because each stage's DVC
dependencies are its import closure (pipeline/dvcgen.py). Importing every stage to find one would make
each verb run, and so depend on, all of them. The fields read this way must be literals;
:func:`check_index` (run by the tests) checks that the index equals the imported declarations."""

from __future__ import annotations

import ast
import functools
import importlib
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

PACKAGE = "stages"
# Stage(...) keywords the index reads from the source. Everything else is read from the imported STAGE.
LITERAL = ("name", "verb", "mode", "parents", "uses", "default_parent", "precision", "reference", "tunable",
           "flags", "summary")


@dataclass(frozen=True)
class Entry:
    """What the CLI, dvc.yaml and the supervisor need to know of a stage without importing it."""
    name: str
    module: str
    verb: str                        # `pipeline <verb>`
    mode: str | None = None          # `pipeline <verb> --mode <mode>` (the quantize stages)
    parents: tuple[str, ...] = ()
    uses: tuple[str, ...] = ()
    default_parent: str | None = None
    precision: str = ""              # set: an ONNX artifact (scored, served, published)
    reference: str = "export"        # what an ONNX artifact is scored against
    tunable: tuple[str, ...] = ()    # `pipeline tune` may search these keys of its section
    flags: dict = field(default_factory=dict)  # CLI flag -> (dotted params key, help[, negative flag])
    summary: str = ""
    writes_metrics: bool = False     # writes its own metrics file at build (``metrics=``): a budget can bound it

    @property
    def command(self) -> str:
        return f"{self.verb} --mode {self.mode}" if self.mode else self.verb

    @property
    def primary_parent(self) -> str | None:
        """The input it takes unless told otherwise (a config's ``parent`` field, if any, overrides it)."""
        return self.default_parent or (self.parents[0] if self.parents else None)

    @property
    def input_flag(self) -> str | None:
        """``--<parent>`` for a stage that reads one kind of non-ONNX artifact (``--data``,
        ``--checkpoint``), ``--input`` for the ONNX-to-ONNX stages."""
        if not self.parents:
            return None
        one = len(self.parents) == 1 and not index()[self.parents[0]].precision
        return f"--{self.parents[0]}" if one else "--input"

    @property
    def scored_against_input(self) -> bool:
        """Its reference is the non-ONNX artifact it reads (the export, against PyTorch): no --reference."""
        return self.input_flag == f"--{self.reference}"


def _stage_call(path: Path) -> ast.Call | None:
    for node in ast.parse(path.read_text(), str(path)).body:
        if (isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "STAGE" for t in node.targets)
                and isinstance(node.value, ast.Call)):
            return node.value
    return None


def _entry(module: str, call: ast.Call, where: str) -> Entry:
    given = {}
    for kw in call.keywords:
        if kw.arg in LITERAL:
            try:
                given[kw.arg] = ast.literal_eval(kw.value)
            except ValueError:
                raise ValueError(f"{where}: Stage({kw.arg}=...) must be a literal (the registry reads it "
                                 f"without importing the stage)") from None
    for key in ("parents", "uses", "tunable"):
        given[key] = tuple(given.get(key, ()))
    given.setdefault("verb", given["name"])
    writes = any(kw.arg == "metrics" for kw in call.keywords)
    return Entry(module=module, writes_metrics=writes, **given)


def _order(entries: dict[str, Entry]) -> dict[str, Entry]:
    """DAG order: by depth along each stage's default input and the artifacts it uses, then by name."""
    depth: dict[str, int] = {}

    def visit(name: str, path: tuple[str, ...]) -> int:
        if name in depth:
            return depth[name]
        if name in path:
            raise ValueError(f"stages form a cycle: {' -> '.join((*path, name))}")
        entry = entries[name]
        primary = entry.default_parent or (entry.parents[0] if entry.parents else None)
        reads = ((primary,) if primary else ()) + entry.uses
        for dep in (*entry.parents, *reads):
            if dep not in entries:
                raise ValueError(f"stage {name} reads {dep!r}, which no module in {PACKAGE}/ declares")
        depth[name] = 1 + max((visit(dep, (*path, name)) for dep in reads), default=-1)
        return depth[name]

    for name in entries:
        visit(name, ())
    return {name: entries[name] for name in sorted(entries, key=lambda n: (depth[n], n))}


@functools.lru_cache(maxsize=1)
def index() -> dict[str, Entry]:
    """Every stage, by name, in DAG order."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"the {PACKAGE} package is not installed")
    folder = Path(next(iter(spec.submodule_search_locations)))
    entries: dict[str, Entry] = {}
    for path in sorted(folder.glob("*.py")):
        call = _stage_call(path)
        if call is None:
            continue
        entry = _entry(f"{PACKAGE}.{path.stem}", call, str(path))
        if entry.name in entries:
            raise ValueError(f"{path}: stage {entry.name!r} is declared twice")
        entries[entry.name] = entry
    return _order(entries)


STAGES = {name: e.module for name, e in index().items()}
# The ONNX artifacts: scored against a reference, served, published.
ONNX = tuple(name for name, e in index().items() if e.precision)
# Artifacts with figures a budget can name: those that write their own metrics (the checkpoint) and every
# ONNX artifact. (The imatrix is calibration statistics: its consumers are scored, not it.)
ARTIFACTS = tuple(name for name, e in index().items() if e.writes_metrics or e.precision)
# The artifacts `pipeline tune` searches recipes for.
TUNABLE = tuple(name for name, e in index().items() if e.tunable)


def modes(verb: str) -> dict[str, Entry]:
    """``--mode`` value -> stage, for a verb that builds several stages."""
    return {e.mode: e for e in index().values() if e.verb == verb and e.mode}


def load(name: str):
    """The :class:`pipeline.runner.Stage` declared for ``name``."""
    stage = importlib.import_module(STAGES[name]).STAGE
    assert stage.name == name, f"{STAGES[name]} declares stage {stage.name!r}, indexed as {name!r}"
    return stage


def check_index() -> None:
    """The index read from the source equals every imported declaration (a test runs this)."""
    for name, entry in index().items():
        stage = load(name)
        for key in LITERAL:
            got = (stage.verb or stage.name) if key == "verb" else getattr(stage, key)
            want = getattr(entry, key)
            assert (tuple(got) if isinstance(got, (list, tuple)) else got) == want, (name, key, got, want)
        assert (stage.metrics is not None) == entry.writes_metrics, name
