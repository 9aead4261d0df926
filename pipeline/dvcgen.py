"""dvc.yaml, generated from the stage declarations (pipeline/registry.py, each stage's ``STAGE``).

A stage's code dependencies are the files of every first-party module it can execute: the import
closure (grimp, import-linter's graph) of the stage's module, plus the CLI module that runs it and
what that imports at its top level. Editing any of them re-runs exactly the stages that execute it;
nothing is listed by hand, so nothing can be forgotten. ``pipeline dvc-yaml --check`` (and a test)
keeps the committed file equal to what this module renders."""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import yaml

from . import registry

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "stages")
BENCH_RESULTS = "benchmarks/results.json"  # the report's tok/s panel (python benchmarks/bench.py)


@functools.lru_cache(maxsize=1)
def _graph():
    import grimp

    return grimp.build_graph(*PACKAGES, cache_dir=None)


def _with_packages(modules: set[str]) -> set[str]:
    """Importing ``a.b`` runs ``a/__init__.py`` first."""
    out = set(modules)
    for m in modules:
        parts = m.split(".")
        out |= {".".join(parts[:i]) for i in range(1, len(parts))}
    return out


def _discovers(package: str) -> bool:
    """Does ``package``'s __init__ import its modules by discovery (``DISCOVERS_MODULES = True``)? No import
    statement names them, so the graph cannot see them."""
    init = ROOT.joinpath(*package.split("."), "__init__.py")
    if not init.is_file():
        return False
    return any(isinstance(n, ast.Assign) and any(getattr(t, "id", None) == "DISCOVERS_MODULES" for t in n.targets)
               for n in ast.parse(init.read_text()).body)


def closure(*modules: str) -> set[str]:
    """First-party modules ``modules`` import, directly or not (function-level imports included); a package
    that discovers its modules (pipeline/families/) brings all of them."""
    graph = _graph()
    out, todo = set(), set(modules)
    while todo:
        found = set(todo)
        for m in todo:
            found |= graph.find_upstream_modules(m)
        found = _with_packages(found)
        out |= found
        todo = {child for p in found if _discovers(p) for child in graph.find_children(p)} - out
    return out


def cli_base() -> set[str]:
    """What `pipeline <verb>` runs before any verb: pipeline.__main__, pipeline.cli and its top-level imports."""
    tree = ast.parse((ROOT / "pipeline" / "cli.py").read_text())
    top = set()
    for node in tree.body:
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level == 1:
            module = "pipeline" + (f".{node.module}" if node.module else "")
        elif node.module and node.module.split(".")[0] in PACKAGES:
            module = node.module
        else:
            continue
        top.add(module)
        # `from .ops import supervise`: a name that is a module of the package is imported too
        top |= {f"{module}.{a.name}" for a in node.names if _is_module(f"{module}.{a.name}")}
    return {"pipeline.__main__", "pipeline.cli"} | closure(*top)


def _is_module(name: str) -> bool:
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def module_file(name: str) -> str:
    path = ROOT.joinpath(*name.split("."))
    return (path / "__init__.py" if path.is_dir() else path.with_suffix(".py")).relative_to(ROOT).as_posix()


def code_deps(*modules: str) -> list[str]:
    return sorted(module_file(m) for m in closure(*modules) | cli_base())


def stage_modules(name: str) -> tuple[str, ...]:
    """The modules `pipeline <verb>` runs for stage ``name``: the stage's own and the runner the verb calls
    (``run_stage``; scoring and the manifest come with it)."""
    return registry.STAGES[name], "pipeline.runner"


def _params_of(stage) -> list[str]:
    sections = [stage.section] if stage.section else list(stage.config.model_fields)
    if stage.precision and "eval" not in sections:
        sections += ["eval", "tasks"]  # scored when built
    return sections


def _parent(stage) -> str | None:
    if not stage.parents:
        return None
    if "parent" in stage.config.model_fields:
        return f"${{{stage.section}.parent}}"
    return stage.default_parent or stage.parents[0]


def render() -> str:
    index = registry.index()
    stages: dict = {}
    for name, entry in index.items():
        stage = registry.load(name)
        parent = _parent(stage)
        cmd = [f"pipeline {entry.command}"]
        deps: list[str] = []
        if parent:
            cmd.append(f"{entry.input_flag} artifacts/{parent}")
            deps.append(f"artifacts/{parent}")
        cmd.append(f"--out artifacts/{name}")
        for used in stage.uses:
            cmd.append(f"--{used} artifacts/{used}")
            deps.append(f"artifacts/{used}")
        if entry.precision:
            if not entry.scored_against_input:
                cmd.append(f"--reference artifacts/{entry.reference}")
            cmd.append("--data artifacts/data")
            deps += [f"artifacts/{entry.reference}", "artifacts/data"]
        elif "calibration" in stage.config.model_fields:
            deps.append("artifacts/data")  # the calibration text's default source (params: <section>.calibration)
        deps = sorted(set(deps))
        if entry.writes_metrics:
            cmd.append(f"--metrics metrics/{name}.json")
        cmd.append(f"--run-metrics metrics/build/{name}.json")
        item = {"cmd": " ".join(cmd), "deps": deps + code_deps(*stage_modules(name)), "params": _params_of(stage),
                "outs": [f"artifacts/{name}"]}
        if entry.writes_metrics:
            item["metrics"] = [{f"metrics/{name}.json": {"cache": False}}]
        stages[name] = item
    stages["evaluate"] = {
        "foreach": {name: {"reference": f"artifacts/{index[name].reference}"} for name in registry.ONNX},
        "do": {"cmd": "pipeline evaluate --artifact artifacts/${key} --reference ${item.reference} --name ${key} "
                      "--out metrics/${key}.json",
               "deps": ["artifacts/${key}", "${item.reference}", "artifacts/data",
                        *code_deps("pipeline.scoring.evaluate", "pipeline.text.sources")],
               "params": ["eval", "tasks", "budgets.${key}"],
               "metrics": [{"metrics/${key}.json": {"cache": False}}]}}
    stages["report"] = {
        "cmd": "pipeline report --out reports",
        "deps": [f"metrics/{n}.json" for n in registry.ARTIFACTS] + [BENCH_RESULTS] + code_deps("pipeline.report", "pipeline.gate"),
        "params": ["budgets", "gate"],
        "outs": [{"reports/summary.md": {"cache": False}}, {"reports/summary.json": {"cache": False}}],
        "plots": [{"reports/size_vs_drift.png": {"cache": False}}]}
    artifacts = {}
    for name in registry.ONNX:
        entry = index[name]
        artifacts[f"qwen3-onnx-{name}"] = {"path": f"artifacts/{name}", "type": "model", "desc": entry.summary,
                                           "labels": list(dict.fromkeys(["onnx", entry.precision, name, "qwen3"]))}
    doc = {"stages": stages,
           # Each build's wall time, peak RSS and decode speed: measured per run, so outside every artifact
           # and outside dvc.lock (a rebuild gives the same lock); `dvc metrics show` lists them.
           "metrics": ["metrics/build"],
           # `pipeline tune`'s candidates (written by it, committed by the user): `dvc plots show`
           "plots": [{"tune-size-vs-kld": {"template": "scatter", "x": "size_ratio",
                                           "y": {"reports/tune/candidates.json": "kld_mean"}}},
                     "reports/tune/front.png"],
           "artifacts": artifacts}
    head = ("# Generated by `pipeline dvc-yaml` from the stage declarations (stages/*.py, read by pipeline/registry.py):\n"
            "# edit those, not this file. Each stage depends on every module it runs (its import closure).\n")
    return head + yaml.safe_dump(doc, sort_keys=False, width=120)
