"""The `pipeline` command. Thin: parse options (defaulting to params.yaml), call a stage, print."""

from __future__ import annotations

import errno
import json
import os
import sys
from pathlib import Path

import click

from . import supervise
from .errors import PipelineError
from .log import info
from .params import load_params

PARAMS_OPT = click.option("--params", "params_file", default=None, type=click.Path(dir_okay=False),
                          help="params file [default: ./params.yaml]")
SET_OPT = click.option("-S", "--set", "overrides", multiple=True, metavar="KEY=VALUE",
                       help="override a param, e.g. -S train.steps=50 (repeatable)")


def _write_json(path, data) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


RUN_METRICS_OPT = click.option("--run-metrics", default=None, type=click.Path(dir_okay=False),
                               help="write this run's wall time, peak RSS, decode speed and machine here "
                                    "(per-run figures never go into the artifact)")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="qwen-onnx-pipeline")
def cli():
    """Hugging Face causal LM -> validated, versioned ONNX artifacts."""


def _build(name: str, params, input_dir, out, scoring, run_metrics, uses: dict | None = None) -> dict:
    """Every build verb: the stage's declaration run by the one runner, its run figures written apart."""
    from .manifest import machine
    from .memory import tell_supervisor
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
    from .evaluate import Scoring

    if not eval_after:
        return None
    eval_text = Path(data_dir) / "eval.txt"
    if not eval_text.is_file() or not Path(reference, "manifest.json").is_file():
        info(f"note: the new artifact will not be scored (no {eval_text} or no artifact at {reference}); "
             f"`pipeline evaluate` scores it later")
        return None
    return Scoring(text=eval_text.read_text(), reference=Path(reference), eval=params.eval)


@cli.command()
@PARAMS_OPT
@SET_OPT
@click.option("--out", default="artifacts/data", show_default=True)
@RUN_METRICS_OPT
def data(params_file, overrides, out, run_metrics):
    """Split the text source into train / calibration / eval."""
    _build("data", load_params(params_file, overrides), None, out, None, run_metrics)


@cli.command()
@PARAMS_OPT
@SET_OPT
@click.option("--data", "data_dir", default="artifacts/data", show_default=True)
@click.option("--source", default=None, help="alias for -S model.source=...: builtin:qwen3-tiny, random:qwen3-0.6b, "
                                             "a local HF dir or a hub id")
@click.option("--out", default="artifacts/checkpoint", show_default=True)
@click.option("--metrics", "metrics_out", default=None, help="also write the stage's figures to this JSON file")
@RUN_METRICS_OPT
def checkpoint(params_file, overrides, data_dir, source, out, metrics_out, run_metrics):
    """Train the built-in model or import a checkpoint (local dir / hub id)."""
    from .evaluate import checkpoint_metrics

    params = load_params(params_file, overrides, {"model.source": source} if source else None)
    manifest = _build("checkpoint", params, data_dir, out, None, run_metrics)
    if metrics_out:
        _write_json(metrics_out, checkpoint_metrics(manifest))


@cli.command()
@PARAMS_OPT
@SET_OPT
@click.option("--checkpoint", "checkpoint_dir", default="artifacts/checkpoint", show_default=True)
@click.option("--out", default="artifacts/export", show_default=True)
@click.option("--eval/--no-eval", "eval_after", default=True, show_default=True,
              help="score the export against PyTorch (the checkpoint) on the held-out text before publishing it")
@click.option("--data", "eval_data", default="artifacts/data", show_default=True, help="data artifact for --eval")
@RUN_METRICS_OPT
def export(params_file, overrides, checkpoint_dir, out, eval_after, eval_data, run_metrics):
    """Export the checkpoint to FP32 ONNX with KV cache and check parity with PyTorch."""
    params = load_params(params_file, overrides)
    _build("export", params, checkpoint_dir, out, _scoring(params, eval_after, checkpoint_dir, eval_data), run_metrics)


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
def evaluate(params_file, overrides, artifact, reference, data_dir, text_file, name, out, provider, rescore):
    """Perplexity (llama.cpp style), and vs a reference: drift, KL divergence, top-1 agreement."""
    from calibration.sources import read_split

    from .errors import BudgetExceeded
    from .evaluate import evaluate_artifact

    params = load_params(params_file, overrides, required=False)
    if text_file:
        if not Path(text_file).is_file():
            raise PipelineError(f"--text {text_file}: no such file")
        text = Path(text_file).read_text()
    else:
        text = read_split(data_dir, "eval")
    metrics = evaluate_artifact(artifact, text, params, reference, name, provider, rescore=rescore)
    if out:
        _write_json(out, metrics)
    summary = f"evaluate: {metrics['artifact']} ({metrics['artifact_id']}) ppl {metrics['ppl']:.4f}"
    if "drift_pct" in metrics:
        summary += (f", vs {metrics['reference']} ppl {metrics['ref_ppl']:.4f}: drift {metrics['drift_pct']:+.4f} %, "
                    f"KLD mean {metrics['kld_mean']:.2e} p99 {metrics['kld_p99']:.2e}, top-1 {metrics['top1_agreement']:.2%}")
    summary += f", size {metrics['size_bytes'] / 1e6:.1f} MB ({metrics['size_ratio']:.3f}x) [{metrics['budget']['status']}]"
    click.echo(summary)
    if metrics["budget"]["status"] == "fail":
        raise BudgetExceeded(f"{metrics['artifact']} is outside its budget: {'; '.join(metrics['budget']['violations'])} "
                             f"(budgets.{metrics['artifact']} in params.yaml; set report_only: true to only report)")


def _build_opts(default_in, default_out):
    """The options every derived ONNX stage takes: input, output, scoring when built, run figures."""
    def wrap(fn):
        for opt in reversed((
                PARAMS_OPT, SET_OPT,
                click.option("--input", "input_dir", default=default_in, show_default=default_in is not None,
                             help="parent artifact" + ("" if default_in else " [default: artifacts/<section>.parent]")),
                click.option("--out", default=default_out, show_default=default_out is not None,
                             help="output dir" + ("" if default_out else " [default: artifacts/<stage>]")),
                click.option("--eval/--no-eval", "eval_after", default=True, show_default=True,
                             help="score the new artifact against --reference on the held-out text before publishing "
                                  "it: the figures go into its manifest and model card, and `pipeline evaluate` "
                                  "reuses them"),
                click.option("--reference", "eval_reference", default="artifacts/export", show_default=True,
                             help="reference for --eval (an artifact, or the checkpoint = PyTorch)"),
                click.option("--data", "eval_data", default="artifacts/data", show_default=True,
                             help="data artifact for --eval"),
                RUN_METRICS_OPT)):
            fn = opt(fn)
        return fn
    return wrap


def _derived(name, params, input_dir, out, eval_after, eval_reference, eval_data, run_metrics, uses=None):
    _build(name, params, input_dir, out, _scoring(params, eval_after, eval_reference, eval_data), run_metrics, uses)


@cli.command()
@PARAMS_OPT
@SET_OPT
@click.option("--input", "input_dir", default=None, help="the graph to collect it on [default: artifacts/<imatrix.parent>]")
@click.option("--out", default="artifacts/imatrix", show_default=True, help="output dir")
@RUN_METRICS_OPT
def imatrix(params_file, overrides, input_dir, out, run_metrics):
    """Importance matrix: per projection input channel, mean x^2 and max |x| on the calibration text
    (read by quantize --mode int4 with algorithm imatrix/awq, and by --mode dynamic with smoothing)."""
    params = load_params(params_file, overrides)
    _build("imatrix", params, input_dir or f"artifacts/{params.imatrix.parent}", out, None, run_metrics)


@cli.command()
@_build_opts("artifacts/export", "artifacts/fused")
def fuse(params_file, overrides, input_dir, out, eval_after, eval_reference, eval_data, run_metrics):
    """ORT transformer optimizer (qwen3): fused RMSNorm, SkipRMSNorm; one GroupQueryAttention per layer."""
    _derived("fused", load_params(params_file, overrides), input_dir, out, eval_after, eval_reference, eval_data,
             run_metrics)


@cli.command()
@_build_opts("artifacts/fused", "artifacts/fp16")
def fp16(params_file, overrides, input_dir, out, eval_after, eval_reference, eval_data, run_metrics):
    """FP16 weights and KV cache (the GPU artifact), valid on CPU too."""
    _derived("fp16", load_params(params_file, overrides), input_dir, out, eval_after, eval_reference, eval_data,
             run_metrics)


MODES = {"dynamic": "int8-dynamic", "static": "int8-static", "int4": "int4"}
# quantize's flags: aliases for -S overrides of the mode's section (flag -> modes, key in that section).
ALIASES = {"calibration": (("static",), "calibration.source"),
           "text_column": (("static",), "calibration.text_column"),
           "samples": (("static",), "calibration.samples"),
           "seq_len": (("static",), "calibration.seq_len"),
           "method": (("static",), "method"),
           "smoothquant": (("static",), "smoothquant.enabled"),
           "alpha": (("static",), "smoothquant.alpha"),
           "block_size": (("int4", "dynamic"), "block_size"),
           "symmetric": (("int4",), "symmetric"),
           "algorithm": (("int4",), "algorithm")}


@cli.command()
@click.option("--mode", required=True, type=click.Choice(sorted(MODES)), help="dynamic | static | int4")
@_build_opts(None, None)
@click.option("--calibration", default=None, help="static: calibration source (file, dir or dataset name)")
@click.option("--text-column", default=None, help="static: text column of the calibration source")
@click.option("--samples", type=int, default=None, help="static: calibration windows")
@click.option("--seq-len", type=int, default=None, help="static: tokens per calibration window")
@click.option("--method", default=None, type=click.Choice(["MinMax", "Entropy", "Percentile"]), help="static: calibration method")
@click.option("--smoothquant/--no-smoothquant", default=None, help="static: SmoothQuant before calibration")
@click.option("--alpha", type=float, default=None, help="static: SmoothQuant alpha")
@click.option("--block-size", type=int, default=None, help="int4 / dynamic: weights per quantization block")
@click.option("--symmetric/--asymmetric", default=None, help="int4: symmetric blocks")
@click.option("--algorithm", default=None, type=click.Choice(["rtn", "k_quant", "imatrix", "awq"]),
              help="int4: quantization algorithm")
@click.option("--imatrix", "imatrix_dir", default="artifacts/imatrix", show_default=True,
              help="int4 (imatrix, awq) / dynamic (smoothing): the importance matrix artifact (pipeline imatrix)")
def quantize(mode, params_file, overrides, input_dir, out, eval_after, eval_reference, eval_data, run_metrics,
             imatrix_dir, **flags):
    """INT8 dynamic, INT8 static (calibrated, QDQ) or INT4 weight-only (MatMulNBits).

    Each flag is an alias for -S <section>.<key>=<value> of the mode's section (int8_dynamic, int8_static, int4)."""
    from . import registry

    name = MODES[mode]
    section = registry.load(name).section
    values = {}
    for flag, value in flags.items():
        if value is None:
            continue
        modes, key = ALIASES[flag]
        if mode not in modes:
            raise PipelineError(f"--{flag.replace('_', '-')} applies to --mode {' or '.join(modes)} only")
        values[f"{section}.{key}"] = value
    params = load_params(params_file, overrides, values)
    parent = getattr(params, section).parent
    uses = {"imatrix": imatrix_dir} if "imatrix" in registry.load(name).uses else None
    _derived(name, params, input_dir or f"artifacts/{parent}", out or f"artifacts/{name}", eval_after, eval_reference,
             eval_data, run_metrics, uses)


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
    from .runtime import Runtime
    from .verify import verify

    if system is not None and not chat:
        raise PipelineError("--system applies to --chat only")
    verify(artifact, load=False)  # files, hashes, id, external data; opening the session is the load check
    texts = list(prompts)
    if chat:
        from .chat import render

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

    params = load_params(params_file, overrides, required=False)
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

    params = load_params(params_file, overrides, required=False)
    rows = g.judge(g.load_metrics(metrics_dir or params.gate.metrics_dir), params)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    bench_data, bench_label = g.bench_for_plot(
        json.loads(Path(bench).read_text()) if bench and Path(bench).is_file() else None)
    (out / "summary.md").write_text("# Artifacts\n\n" + g.markdown(rows))
    (out / "summary.json").write_text(json.dumps(g.summary_json(rows), indent=2) + "\n")
    g.plot(rows, out / "size_vs_drift.png", bench_data, bench_label)
    info(f"report: {out}/summary.md, summary.json, size_vs_drift.png ({len(rows)} artifacts; {bench_label})")


@cli.command()
@PARAMS_OPT
@SET_OPT
@click.option("--artifact", type=click.Choice(["int4", "int8-dynamic", "int8-static"]), default=None,
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
    from . import tune as t

    params_path = Path(params_file or "params.yaml")
    if apply_:
        values = t.apply(Path(recipe), params_path)
        info(f"tune --apply: {params_path} now sets {', '.join(f'{k}={t.fmt(v)}' for k, v in values.items())}; "
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
    merged.update(t.parse_budget(budget))
    if not merged:
        raise PipelineError(f"tune: no budget for {artifact}: give --budget kld_mean=... or set budgets.{artifact}")
    space = cfg.space.get(artifact) or {}
    if not space:
        raise PipelineError(f"tune: tune.space.{artifact} is empty: nothing to search")
    opts = t.Options(artifact=artifact, objective=objective or cfg.objective, strategy=strategy or cfg.strategy,
                     budget=merged, space=space, promote=cfg.promote.get(artifact) or {},
                     max_candidates=max_candidates or cfg.max_candidates, workers=workers or cfg.workers,
                     seed=cfg.seed, decode_tokens=cfg.decode_tokens, slice=(k, n), remote=remote, collect=collect)
    t.tune(Path.cwd(), params_path, params, opts)


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
def verify_cmd(directory):
    """Check an artifact's manifest, hashes, id, external data and that ORT loads it; print its lineage."""
    from .verify import lineage, verify

    manifest = verify(directory)
    click.echo(f"verified: {directory} ({manifest['stage']}, {len(manifest['files'])} files, "
               f"{manifest['size_bytes'] / 1e6:.1f} MB)")
    click.echo(f"lineage: {lineage(manifest)}")


def main():
    if supervise.wanted(sys.argv):  # a stage verb: run it in a watched child (pipeline/supervise.py)
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
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) and "No space left" not in str(exc):
            _internal(exc)
        where = f" writing {exc.filename}" if exc.filename else ""
        click.echo(f"error: no space left on the device{where}: free some space (or write the artifacts to a larger "
                   f"disk) and run again; nothing was published", err=True)
        sys.exit(2)
    except Exception as exc:  # a bug, not bad input: one line, traceback on request
        _internal(exc)


def _internal(exc: BaseException):
    """A bug, not bad input: one line, the traceback on request."""
    if os.environ.get("PIPELINE_DEBUG"):
        raise exc
    click.echo(f"internal error: {type(exc).__name__}: {exc} (set PIPELINE_DEBUG=1 for the traceback)", err=True)
    sys.exit(3)
