"""The `pipeline` command. Thin: parse options (defaulting to params.yaml), call a stage, print."""

from __future__ import annotations

import errno
import json
import os
import sys
from pathlib import Path

import click

from . import registry
from .errors import PipelineError
from .log import info
from .ops import supervise
from .params import load_params
from .scoring import metrics as metric_table

PARAMS_OPT = click.option("--params", "params_file", default=None, type=click.Path(dir_okay=False),
                          help="params file [default: ./params.yaml]")
SET_OPT = click.option("-S", "--set", "overrides", multiple=True, metavar="KEY=VALUE",
                       help="override a param, e.g. -S train.steps=50 (repeatable)")


def _write_json(path, data) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, allow_nan=False) + "\n")  # a figure we write is finite
    tmp.replace(path)


RUN_METRICS_OPT = click.option("--run-metrics", default=None, type=click.Path(dir_okay=False),
                               help="write this run's wall time, peak RSS, decode speed and machine here "
                                    "(per-run figures never go into the artifact)")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="qwen-onnx-pipeline")
def cli():
    """Hugging Face causal LM -> validated, versioned ONNX artifacts."""


def _build(name: str, params, input_dir, out, scoring, run_metrics, uses: dict | None = None) -> dict:
    """The stage run by the one runner, its run figures written apart."""
    from .consumer.manifest import machine
    from .ops.memory import tell_supervisor
    from .runner import run_stage

    if run_metrics:  # the supervisor adds its sampled anonymous / file-backed peaks to it
        tell_supervisor(run_metrics=str(Path(run_metrics).resolve()))
    built = run_stage(name, params, input_dir, out, scoring, uses)
    if run_metrics:
        _write_json(run_metrics, {"artifact": name, "artifact_id": built.manifest["artifact_id"], **built.run,
                                  "machine": machine()})
    return built.manifest


def _scoring(params, eval_after: bool, reference: str, data_dir: str):
    """What a stage scores its artifact against when it builds it (None: not scored, and why)."""
    from .scoring.evaluate import Scoring

    if not eval_after:
        return None
    eval_text = Path(data_dir) / "eval.txt"
    if not eval_text.is_file() or not Path(reference, "manifest.json").is_file():
        info(f"note: the new artifact will not be scored (no {eval_text} or no artifact at {reference}); "
             f"`pipeline evaluate` scores it later")
        return None
    return Scoring(text=eval_text.read_text(), reference=Path(reference), eval=params.eval, tasks=params.tasks)


@cli.command()
@PARAMS_OPT
@SET_OPT
@click.option("--artifact", required=True, type=click.Path(), help="artifact directory to score")
@click.option("--reference", default=None, type=click.Path(), help="artifact (or checkpoint = PyTorch) to compare with")
@click.option("--data", "data_dir", default="artifacts/data", show_default=True, help="data artifact (eval split)")
@click.option("--text", "text_file", default=None, type=click.Path(), help="score this text file instead")
@click.option("--name", default=None, help="artifact name for budgets.<name> (default: directory name)")
@click.option("--out", default=None, help="write the metrics JSON here")
@click.option("--provider", default="cpu", type=click.Choice(["cpu", "cuda"]), show_default=True)
@click.option("--rescore", is_flag=True, help="score again even when the stage recorded figures for this reference "
                                              "and text, by this scoring code")
@click.option("--tasks", "task_names", default=None,
              help="lm-evaluation-harness tasks, comma-separated: cloze, next_word (built from the held-out text) "
                   "or lm-eval task names (need the network); 'none' for none [default: params tasks.names]")
def evaluate(params_file, overrides, artifact, reference, data_dir, text_file, name, out, provider, rescore,
             task_names):
    """Perplexity (llama.cpp style), and vs a reference: drift, KL divergence, top-1 agreement."""
    from .errors import BudgetExceeded
    from .scoring.evaluate import evaluate_artifact
    from .text.sources import read_split

    params = load_params(params_file, overrides, required=False, stages=())
    if text_file:
        if not Path(text_file).is_file():
            raise PipelineError(f"--text {text_file}: no such file")
        text = Path(text_file).read_text()
    else:
        text = read_split(data_dir, "eval")
    tasks = params.tasks.names if task_names is None else [t for t in task_names.split(",") if t and t != "none"]
    metrics = evaluate_artifact(artifact, text, params, reference, name, provider, rescore=rescore, tasks=tasks)
    if broken := metric_table.not_finite(metrics):
        raise PipelineError(f"evaluate {metrics['artifact']}: {'; '.join(broken)}; no metrics file written")
    if out:
        _write_json(out, metrics)
    versus = f" vs {metrics['reference']}" if "drift_pct" in metrics else ""
    summary = (f"evaluate: {metrics['artifact']} ({metrics['artifact_id']}){versus}: "
               f"{metric_table.summary(metrics, (*metric_table.SCORED, *metric_table.ON_REQUEST, metric_table.BY_KEY['size_bytes']))}, "
               f"{metrics['size_ratio']:.3f}x [{metrics['budget']['status']}]")
    click.echo(summary)
    if metrics["budget"]["status"] == "fail":
        raise BudgetExceeded(f"{metrics['artifact']} is outside its budget: {'; '.join(metrics['budget']['violations'])} "
                             f"(budgets.{metrics['artifact']} in params.yaml; set report_only: true to only report)")


# ------------------------------------------------------------------------------------- the build verbs
# One command per stage (or one per verb, with --mode, where several stages share it), made from the
# stage index (pipeline/registry.py): the stage declares its verb, input, reference, the artifacts it
# uses and its flags; nothing about a stage is written here.

def _input_default(stage, params) -> str:
    from .runner import config_of, default_input

    return f"artifacts/{default_input(stage, config_of(stage, params))}"


def _stage_options(entries: list) -> list:
    """The click options of a verb building ``entries`` (one stage, or the modes of one verb)."""
    first = entries[0]
    opts = [PARAMS_OPT, SET_OPT]
    if first.input_flag:
        shown = first.primary_parent if len(entries) == 1 and first.input_flag != "--input" else None
        opts.append(click.option(first.input_flag, "input_dir", default=f"artifacts/{shown}" if shown else None,
                                 show_default=bool(shown),
                                 help="the input artifact" + ("" if shown else " [default: artifacts/<its params "
                                                                              "section's parent, else its parent>]")))
    opts.append(click.option("--out", default=None if first.mode else f"artifacts/{first.name}",
                             show_default=not first.mode, help="output dir" + (" [default: artifacts/<stage>]"
                                                                                if first.mode else "")))
    if first.precision:
        opts.append(click.option("--eval/--no-eval", "eval_after", default=True, show_default=True,
                                 help="score the new artifact against its reference on the held-out text before "
                                      "publishing it: the figures go into its manifest and model card, and `pipeline "
                                      "evaluate` reuses them"))
        if not first.scored_against_input:
            opts.append(click.option("--reference", "eval_reference", default=f"artifacts/{first.reference}",
                                     show_default=True, help="reference for --eval (an artifact, or the checkpoint "
                                                             "= PyTorch)"))
        opts.append(click.option("--data", "eval_data", default="artifacts/data", show_default=True,
                                 help="data artifact for --eval"))
    for used in dict.fromkeys(u for e in entries for u in e.uses):
        opts.append(click.option(f"--{used}", f"use_{used}", default=f"artifacts/{used}", show_default=True,
                                 help=f"the {used} artifact it reads (pipeline {used})"))
    if first.writes_metrics:
        opts.append(click.option("--metrics", "metrics_out", default=None,
                                 help="also write the stage's figures to this JSON file"))
    seen: dict = {}
    for e in entries:
        for flag, spec in e.flags.items():
            seen.setdefault(flag, (spec, []))[1].append(e.mode or e.name)
    for flag, (spec, where) in seen.items():
        note = f"{'/'.join(where)}: " if first.mode else ""
        decl = f"{flag}/{spec[2]}" if len(spec) > 2 else flag
        opts.append(click.option(decl, "flag_" + flag.lstrip("-").replace("-", "_"), default=None,
                                 help=f"{note}{spec[1] if len(spec) > 1 else ''} (alias for -S "
                                      f"<section>.{spec[0]})"))
    opts.append(RUN_METRICS_OPT)
    return opts


def _flag_values(entry, stage, given: dict) -> dict:
    """The flags given, as dotted params keys (the stage's section first, where it has one)."""
    import yaml

    values = {}
    for name, value in given.items():
        if value is None:
            continue
        flag = "--" + name.removeprefix("flag_").replace("_", "-")
        if flag not in entry.flags:
            modes = [e.mode for e in registry.modes(entry.verb).values() if flag in e.flags]
            raise PipelineError(f"{flag} applies to --mode {' or '.join(modes)} only")
        key = entry.flags[flag][0]
        if isinstance(value, str) and not _is_text(stage, key):  # a number, a bool, a choice: as -S parses it
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError:
                raise PipelineError(f"{flag} {value!r}: not a valid value") from None
        values[f"{stage.section}.{key}" if stage.section else key] = value
    return values


def _is_text(stage, key: str) -> bool:
    """Is the params field at ``key`` (below the stage's section) a plain string (a path, a column)?"""
    model = stage.config
    parts = key.split(".")
    if not stage.section:  # the config's fields are whole sections
        model, parts = model.model_fields[parts[0]].annotation, parts[1:]
    for part in parts[:-1]:
        model = model.model_fields[part].annotation
    return model.model_fields[parts[-1]].annotation is str


def _same_model(input_dir: str, reference: str, stage: str, parents: tuple[str, ...]) -> str:
    """The reference an artifact is scored against is of the same model: an artifact in its input's
    lineage. The default (artifacts/<stage>) is another model's when the input comes from elsewhere; then
    the input's sibling of that stage is taken where it is in the lineage, else one line."""
    from .consumer import manifest as mf

    try:
        parent, ref = mf.read_manifest(input_dir), mf.read_manifest(reference)
    except PipelineError:
        return reference  # absent: not scored (said by _scoring); damaged: the build's verify says so
    mf.expect_stage(parent, parents, Path(input_dir))  # a wrong input is named as such, not as a wrong reference
    ids = {parent["artifact_id"], *(p["artifact_id"] for p in parent["lineage"])}
    if ref["artifact_id"] in ids:
        return reference
    sibling = Path(input_dir).parent / stage
    try:
        if sibling.resolve() != Path(reference).resolve() and mf.read_manifest(sibling)["artifact_id"] in ids:
            info(f"note: scored against {sibling}, the {stage} of {input_dir}'s lineage ({reference} is another model's)")
            return str(sibling)
    except PipelineError:
        pass
    mf.check_files(input_dir, parent)  # a damaged input is named as such first
    raise PipelineError(f"the reference {reference} ({ref['stage']} {ref['artifact_id']}) is not in the lineage of "
                        f"{input_dir}: it belongs to another model. Pass --reference DIR (this model's {stage}) or "
                        f"--no-eval")


def _run_verb(entry, params_file, overrides, input_dir=None, out=None, eval_after=False, eval_reference=None,
              eval_data="artifacts/data", run_metrics=None, metrics_out=None, **rest):
    """Every build verb: the stage's declaration run by the one runner, its figures written apart."""
    stage = registry.load(entry.name)
    uses = {name.removeprefix("use_"): rest.pop(name) for name in list(rest) if name.startswith("use_")}
    params = load_params(params_file, overrides, _flag_values(entry, stage, rest), stages=(entry.name,))
    input_dir = input_dir or (_input_default(stage, params) if entry.parents else None)
    reference = input_dir if entry.scored_against_input else eval_reference
    if eval_after and entry.precision and not entry.scored_against_input:
        reference = _same_model(input_dir, reference, entry.reference, stage.parents)
    scoring = _scoring(params, eval_after, reference, eval_data) if entry.precision else None
    manifest = _build(entry.name, params, input_dir, out or f"artifacts/{entry.name}", scoring, run_metrics,
                      {k: v for k, v in uses.items() if k in stage.uses} or None)
    if metrics_out:
        _write_json(metrics_out, stage.metrics(manifest))


def _add_build_verbs() -> None:
    verbs: dict[str, list] = {}
    for entry in registry.index().values():
        verbs.setdefault(entry.verb, []).append(entry)
    for verb, entries in verbs.items():
        if entries[0].mode:
            modes = {e.mode: e for e in entries}

            def callback(mode, _modes=modes, **kw):
                _run_verb(_modes[mode], **kw)

            helptext = "; ".join(f"--mode {m}: {modes[m].summary}" for m in sorted(modes))
            params = [click.Option(["--mode"], required=True, type=click.Choice(sorted(modes)),
                                   help=" | ".join(sorted(modes)))]
        else:
            def callback(_entry=entries[0], **kw):
                _run_verb(_entry, **kw)

            helptext, params = entries[0].summary, []
        for opt in reversed(_stage_options(entries)):
            callback = opt(callback)
        if any(e.flags for e in entries):
            helptext += ". Each of its flags is an alias for a -S <key>=<value> override."
        command = click.command(verb, help=helptext)(callback)
        command.params[:0] = params
        cli.add_command(command)


_add_build_verbs()


@cli.command()
@click.option("--artifact", required=True, type=click.Path(), help="ONNX artifact directory")
@click.argument("prompts", nargs=-1, required=True, metavar="PROMPT...")
@click.option("--max-new-tokens", default=64, show_default=True, type=click.IntRange(min=1))
@click.option("--temperature", default=0.0, show_default=True, type=click.FloatRange(min=0), help="0 = greedy")
@click.option("--top-k", default=0, show_default=True, type=click.IntRange(min=0))
@click.option("--top-p", default=1.0, show_default=True, type=click.FloatRange(0, 1, min_open=True))
@click.option("--seed", default=0, show_default=True)
@click.option("--provider", default="cpu", type=click.Choice(["cpu", "cuda"]), show_default=True)
@click.option("--chat", is_flag=True, help="each PROMPT is a user message: apply the chat template the artifact ships")
@click.option("--system", default=None, help="with --chat: a system message before PROMPT")
@click.option("--prefill-chunk", default=None, type=click.IntRange(min=1),
              help="prompt tokens per prefill step (default 512; smaller at long contexts, docs/long-context.md)")
def generate(artifact, prompts, max_new_tokens, temperature, top_k, top_p, seed, provider, chat, system, prefill_chunk):
    """Stream a continuation of PROMPT from an artifact (verified first); with --chat, the assistant's reply.

    Several PROMPTs run as one padded batch and print when all are done."""
    from .consumer.runtime import Runtime
    from .consumer.verify import verify

    if system is not None and not chat:
        raise PipelineError("--system applies to --chat only")
    verify(artifact, load=False)  # files, hashes, id, external data; opening the session is the load check
    texts = list(prompts)
    if chat:
        from .consumer.chat import render

        head = [{"role": "system", "content": system}] if system is not None else []
        texts = [render(artifact, head + [{"role": "user", "content": p}]) for p in prompts]
    rt = Runtime(artifact, provider=provider, prefill_chunk=prefill_chunk)
    ids = [rt.encode(t) for t in texts]
    rt.check_request(ids, max_new_tokens)  # refuse before printing anything
    sampling = {"temperature": temperature, "top_k": top_k, "top_p": top_p, "seed": seed}
    if len(ids) > 1:
        outs = rt.generate_batch(ids, max_new_tokens, **sampling)
        for i, (prompt, out) in enumerate(zip(prompts, outs)):
            click.echo(f"[{i + 1}] " + ("" if chat else prompt) + rt.decode(out))
        info(f"generate: {len(outs)} prompts as one batch, {sum(map(len, outs))} tokens from {artifact}")
        return
    out: list[int] = []
    shown = [""]

    def on_token(tok):  # decode the whole continuation each time so multi-byte characters print whole
        out.append(tok)
        text = rt.decode(out)
        if not text.endswith("\ufffd"):
            sys.stdout.write(text[len(shown[0]):])
            sys.stdout.flush()
            shown[0] = text

    if not chat:  # a continuation reads on from the prompt; a chat reply stands alone
        sys.stdout.write(prompts[0])
    rt.generate(ids[0], max_new_tokens, on_token=on_token, **sampling)
    sys.stdout.write("\n")
    info(f"generate: {len(out)} tokens from {artifact}")


@cli.command()
@PARAMS_OPT
@SET_OPT
@click.option("--metrics-dir", default=None, help="metrics directory (default: gate.metrics_dir)")
@click.option("--baseline", default=None, help="git revision to compare with (through `dvc metrics diff`)")
@click.option("--baseline-file", default=None, type=click.Path(), help="metrics file/dir or summary.json another deployment published")
@click.option("--summary", default=None, type=click.Path(), help="append the markdown table here (e.g. $GITHUB_STEP_SUMMARY)")
def gate(params_file, overrides, metrics_dir, baseline, baseline_file, summary):
    """Fail (exit 1) when an artifact is over its budget or regressed against a baseline."""
    from . import gate as g

    params = load_params(params_file, overrides, required=False, stages=())
    metrics = g.load_metrics(metrics_dir or params.gate.metrics_dir)
    if baseline and baseline_file:
        raise PipelineError("give --baseline or --baseline-file, not both")
    base = g.baseline_from_rev(baseline, metrics) if baseline else (
        g.baseline_from_file(baseline_file) if baseline_file else None)
    rows = g.judge(metrics, params, base)
    table = g.markdown(rows)
    click.echo(table)
    if summary:
        with open(summary, "a") as fh:
            fh.write(table)
    failed = [r["artifact"] for r in rows if r["status"] == "fail"]
    if failed:
        from .errors import BudgetExceeded

        raise BudgetExceeded(f"gate failed for {', '.join(failed)}")
    info(f"gate: {len(rows)} artifacts pass" + (f" (baseline {baseline or baseline_file})" if base else ""))


@cli.command()
@PARAMS_OPT
@SET_OPT
@click.option("--metrics-dir", default=None, help="metrics directory (default: gate.metrics_dir)")
@click.option("--bench", default="benchmarks/results.json", show_default=True, help="benchmark results, if present")
@click.option("--out", default="reports", show_default=True)
def report(params_file, overrides, metrics_dir, bench, out):
    """Write reports/summary.md, summary.json and size_vs_drift.png."""
    from . import gate as g
    from . import report as r

    params = load_params(params_file, overrides, required=False, stages=())
    rows = g.judge(g.load_metrics(metrics_dir or params.gate.metrics_dir), params)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    bench_data, bench_label = r.bench_for_plot(
        json.loads(Path(bench).read_text()) if bench and Path(bench).is_file() else None)
    (out / "summary.md").write_text("# Artifacts\n\n" + g.markdown(rows))
    (out / "summary.json").write_text(json.dumps(r.summary_json(rows), indent=2) + "\n")
    r.plot(rows, out / "size_vs_drift.png", bench_data, bench_label)
    info(f"report: {out}/summary.md, summary.json, size_vs_drift.png ({len(rows)} artifacts; {bench_label})")


@cli.command()
@PARAMS_OPT
@SET_OPT
@click.option("--artifact", type=click.Choice(registry.TUNABLE), default=None,
              help="the artifact whose recipe is searched [default: tune.artifact]")
@click.option("--budget", default=None, metavar="METRIC=X,...",
              help="e.g. kld_mean=0.005,drift_pct=1,top1=0.95 (over budgets.<artifact> and tune.budget)")
@click.option("--objective", type=click.Choice(["size", "decode", "both"]), default=None,
              help="smallest artifact, fastest decode here, or both [default: tune.objective]")
@click.option("--strategy", type=click.Choice(["greedy", "grid", "random"]), default=None,
              help="[default: tune.strategy]")
@click.option("--workers", type=click.IntRange(1), default=None, help="DVC queue workers [default: tune.workers]")
@click.option("--max-candidates", type=click.IntRange(1), default=None, help="[default: tune.max_candidates]")
@click.option("--slice", "slice_", default="1/1", metavar="K/N", show_default=True,
              help="run every N-th candidate of each round from the K-th (one machine of N)")
@click.option("--remote", default=None, metavar="GIT_REMOTE",
              help="share candidates: `dvc exp pull` before each round, `dvc exp push` after (artifacts to the "
                   "default DVC remote)")
@click.option("--collect", is_flag=True, help="queue nothing: pull (with --remote) and report what has run")
@click.option("--apply", "apply_", is_flag=True, help="write the recipe into params.yaml (then `dvc repro`)")
@click.option("--recipe", default="reports/tune/recipe.yaml", show_default=True, type=click.Path(dir_okay=False),
              help="the recipe --apply reads")
def tune(params_file, overrides, artifact, budget, objective, strategy, workers, max_candidates, slice_, remote,
         collect, apply_, recipe):
    """Search the smallest (or fastest) recipe inside a budget; each candidate is a DVC experiment."""
    from .tune.queue import tune as run_tune
    from .tune.report import apply as apply_recipe
    from .tune.search import Options, fmt, parse_budget

    params_path = Path(params_file or "params.yaml")
    if apply_:
        values = apply_recipe(Path(recipe), params_path)
        info(f"tune --apply: {params_path} now sets {', '.join(f'{k}={fmt(v)}' for k, v in values.items())}; "
             f"`dvc repro` builds it (from DVC's run-cache when tune ran it) and `pipeline gate` checks it")
        return
    foreign = [o for o in overrides if not o.startswith("tune.")]
    if foreign:
        raise PipelineError(f"tune -S sets tune.* only ({foreign[0]!r}): every candidate is HEAD plus its own "
                            f"overrides, so commit other changes to params.yaml first")
    params = load_params(params_file, overrides)
    cfg = params.tune
    artifact = artifact or cfg.artifact
    try:
        k, n = (int(x) for x in slice_.split("/"))
        assert 1 <= k <= n
    except (ValueError, AssertionError):
        raise PipelineError(f"--slice {slice_!r}: expected K/N with 1 <= K <= N, e.g. 1/2") from None
    merged = {key: v for key, v in (params.budgets.get(artifact) or {}).items() if key != "report_only"}
    merged.update(cfg.budget)
    merged.update(parse_budget(budget))
    if not merged:
        raise PipelineError(f"tune: no budget for {artifact}: give --budget kld_mean=... or set budgets.{artifact}")
    space = cfg.space.get(artifact) or {}
    if not space:
        raise PipelineError(f"tune: tune.space.{artifact} is empty: nothing to search")
    opts = Options(artifact=artifact, objective=objective or cfg.objective, strategy=strategy or cfg.strategy,
                     budget=merged, space=space, promote=cfg.promote.get(artifact) or {},
                     max_candidates=max_candidates or cfg.max_candidates, workers=workers or cfg.workers,
                     seed=cfg.seed, decode_tokens=cfg.decode_tokens, slice=(k, n), remote=remote, collect=collect)
    run_tune(Path.cwd(), params_path, params, opts)


@cli.command("check-params")
@PARAMS_OPT
@SET_OPT
def checkload_params(params_file, overrides):
    """Check params.yaml (and -S overrides) against the schema; exit non-zero on the first problem."""
    params = load_params(params_file, overrides)
    click.echo(f"params ok: {params_file or 'params.yaml'} ({len(type(params).model_fields)} sections)")


@cli.command("dvc-yaml")
@click.option("--check", is_flag=True, help="exit 1 if dvc.yaml differs from what the stage declarations give")
@click.option("--out", default="dvc.yaml", show_default=True)
def dvc_yaml(check, out):
    """Write dvc.yaml from the stage declarations: every stage's deps are the modules it runs (its import
    closure), so no dependency can be forgotten."""
    from . import dvcgen

    text = dvcgen.render()
    if check:
        if not Path(out).is_file() or Path(out).read_text() != text:
            raise PipelineError(f"{out} is not what the stage declarations give: run `pipeline dvc-yaml` and commit it")
        click.echo(f"{out} is up to date with the stage declarations")
        return
    Path(out).write_text(text)
    info(f"dvc-yaml: wrote {out} ({text.count(chr(10))} lines)")


@cli.command("verify")
@click.argument("directory", type=click.Path())
@click.option("--expect-id", default=None, help="refuse unless the artifact id is this one (the id you trust: from "
                                                 "the publisher's dvc.lock or release notes)")
@click.option("--lock", "lock_spec", default=None, metavar="DVC.LOCK[@REV]",
              help="refuse unless the artifact's files are what this dvc.lock (at a git revision: a tag, a commit) "
                   "pins for its stage's output")
@click.option("--key", "public_key", default=None, type=click.Path(dir_okay=False),
              help="refuse unless the artifact is signed (model.sig) by this public key's owner (PEM)")
def verify_cmd(directory, expect_id, lock_spec, public_key):
    """Check an artifact's manifest, hashes, id, external data and that ORT loads it; print its lineage.
    With --expect-id / --lock and --key, also that it is the artifact and from the publisher you trust."""
    from .consumer.verify import lineage, verify

    manifest = verify(directory)
    levels = ["integrity"]
    if expect_id is not None:
        if manifest["artifact_id"] != expect_id:
            raise PipelineError(f"{directory} is artifact {manifest['artifact_id']}, not the expected {expect_id}: "
                                f"refused")
        levels.append("pinned id")
    if lock_spec is not None:
        from . import project
        from .consumer.manifest import SIGNATURE

        text, where = project.read_at(lock_spec)
        pinned, out = project.locked_hash(text, where, manifest["stage"])
        # the lock of the build, or of the signed output once `dvc commit` recorded it (docs/consuming.md)
        found = project.dvc_dir_md5(directory)
        if found != pinned and (Path(directory) / SIGNATURE).is_file():
            found = project.dvc_dir_md5(directory, skip=(SIGNATURE,))
        if found != pinned:
            raise PipelineError(f"{directory}'s files (md5 {found}) are not what {where} pins for {out} ({pinned}): "
                                f"refused")
        levels.append(f"pinned by {where}")
    if public_key is not None:
        from .consumer.signing import check_signature

        check_signature(directory, public_key)
        levels.append(f"signed ({public_key})")
    click.echo(f"verified: {directory} ({manifest['stage']} {manifest['artifact_id']}, {len(manifest['files'])} files, "
               f"{manifest['size_bytes'] / 1e6:.1f} MB; {', '.join(levels)})")
    click.echo(f"lineage: {lineage(manifest)}")


@cli.command("lm-eval", context_settings={"ignore_unknown_options": True, "allow_extra_args": True,
                                         "help_option_names": []})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def lm_eval_cmd(args):
    """lm-evaluation-harness's own CLI, every option, with our runtime as its model `pipeline-onnx`:
    `pipeline lm-eval --model pipeline-onnx --model_args artifact=DIR --tasks ...`."""
    from .scoring.tasks import lm_eval_cli

    lm_eval_cli(list(args))


@cli.command("sign")
@click.argument("directory", type=click.Path())
@click.option("--key", "private_key", required=True, type=click.Path(dir_okay=False),
              help="the publisher's EC private key (PEM)")
@click.option("--password-env", default=None, help="the environment variable holding the key's password, if any")
def sign_cmd(directory, private_key, password_env):
    """Sign a verified artifact with OpenSSF model-signing: writes DIRECTORY/model.sig (then `dvc commit`)."""
    from .consumer.signing import sign
    from .consumer.verify import verify

    manifest = verify(directory, load=False)
    password = None
    if password_env:
        password = os.environ.get(password_env)
        if password is None:
            raise PipelineError(f"--password-env {password_env}: no such environment variable")
    path = sign(directory, private_key, password)
    click.echo(f"signed: {directory} ({manifest['stage']} {manifest['artifact_id']}) -> {path}")


def main():
    if supervise.wanted(sys.argv):  # a stage verb: run it in a watched child (pipeline/ops/supervise.py)
        sys.exit(supervise.run(sys.argv))
    if os.environ.get(supervise.ENV):
        supervise.as_child()
    try:
        cli.main(standalone_mode=False)
    except PipelineError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:  # usage errors too: one line, not a usage block
        click.echo(f"error: {exc.format_message()}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except Exception as exc:  # a bug, not bad input (or a full disk, which any library may report): one line
        if not _disk_full(exc):
            _internal(exc)
        where = f" writing {exc.filename}" if getattr(exc, "filename", None) else ""
        click.echo(f"error: no space left on the device{where}: free some space (or write the artifacts to a larger "
                   f"disk) and run again; nothing was published", err=True)
        sys.exit(2)


def _disk_full(exc: BaseException) -> bool:
    """ENOSPC, however the library that met it reports it (an OSError, onnx's or onnxruntime's own
    exception carrying the message)."""
    full = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
    return (isinstance(exc, OSError) and exc.errno in full) or "No space left on device" in str(exc)


def _internal(exc: BaseException):
    """A bug, not bad input: one line, the traceback on request."""
    if os.environ.get("PIPELINE_DEBUG"):
        raise exc
    click.echo(f"internal error: {type(exc).__name__}: {exc} (set PIPELINE_DEBUG=1 for the traceback)", err=True)
    sys.exit(3)
