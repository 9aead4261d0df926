"""Perplexity, KL divergence and top-1 agreement, computed the way llama.cpp's perplexity tool does.

The held-out text is tokenized once and cut into non-overlapping windows of ``ctx`` tokens; only the
second half of each window is scored, so every scored token has at least ctx/2 tokens of context.
A *scorer* is anything with ``logits(ids) -> (T, V) float array``: the ONNX reference runtime or
the PyTorch model. Reference and candidate run window by window, so memory stays bounded.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from pipeline.consumer import manifest as mf
from pipeline.consumer.runtime import Runtime, load_tokenizer
from pipeline.consumer.verify import verify
from pipeline.errors import PipelineError
from pipeline.log import info
from pipeline.schema import Eval, Tasks
from pipeline.scoring import metrics as metric_table
from pipeline.scoring import outputs, parity

# Re-exported, each defined once in outputs.py: the log-softmax, and which code computed a score
# (outputs.py keys its recorded outputs by it too).
from pipeline.scoring.outputs import SCORER_MODULES, log_softmax, scorer_fingerprint  # noqa: F401


@dataclass(frozen=True)
class Scoring:
    """What a new artifact is scored against when it is built: held-out text, a reference artifact
    (or the checkpoint = PyTorch) and the eval settings."""
    text: str
    reference: Path
    eval: Eval
    tasks: Tasks | None = None  # lm-evaluation-harness tasks scored too (their figures go into the card)


def open_model(artifact_dir: Path) -> Callable[[], object]:
    """How to load an artifact as a scorer: the ONNX runtime, or PyTorch for the checkpoint (imported
    only then: the runtime path never loads torch)."""
    if (Path(artifact_dir) / "model.onnx").is_file():
        return lambda: Runtime(artifact_dir)

    def torch_model():
        from pipeline.scoring.torch_ref import TorchModel

        return TorchModel(artifact_dir)
    return torch_model


def encoder(artifact_dir: Path) -> Callable[[str], list[int]]:
    """The artifact's tokenizer as Runtime.encode uses it, without opening a session."""
    tok = load_tokenizer(artifact_dir)
    return lambda text: tok.encode(text, add_special_tokens=False).ids


# Figures of a score, rounded before they are stored: a last-bit difference of another CPU's kernels
# should not change an artifact's manifest.
SIGNIFICANT = 6


def rounded(figures: dict) -> dict:
    return {k: float(f"{v:.{SIGNIFICANT}g}") if isinstance(v, float) else v for k, v in figures.items()}


def make_windows(ids: list[int] | np.ndarray, ctx: int, max_windows: int = 0) -> np.ndarray:
    ids = np.asarray(ids, dtype=np.int64)
    n = len(ids) // ctx
    if n < 2:
        raise PipelineError(f"eval text has {len(ids)} tokens, shorter than two windows of eval.ctx={ctx}: "
                            f"give more held-out text or lower eval.ctx")
    if max_windows and max_windows > 0:
        n = min(n, max_windows)
    return ids[: n * ctx].reshape(n, ctx)


def score(candidate, windows: np.ndarray, reference=None, label: str = "eval", scored: int = 0) -> dict:
    """Perplexity of ``candidate`` (a scorer, already loaded); with ``reference`` also its PPL,
    KL(ref || cand) and top-1 agreement. Both record their outputs and are compared as in every stage
    (pipeline/scoring/outputs.py)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="score-") as tmp:
        cand = outputs.record_windows(candidate, windows, Path(tmp) / "candidate", label, scored)
        ref = outputs.record_windows(reference, windows, Path(tmp) / "reference", f"{label} reference", scored) \
            if reference is not None else None
        return outputs.compare_windows(cand, ref)


def model_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in Path(directory).glob("model.onnx*") if p.is_file())


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def check(candidate_dir: Path, label: str, parent_dir: Path, greedy_tokens: int, scoring: Scoring | None,
          scratch: Path) -> tuple[dict, dict | None, dict, dict]:
    """Parity with the parent and scoring against ``scoring.reference``, one model in memory at a time:
    each reference's outputs come from its cache (pipeline/scoring/outputs.py) or are recorded once, then the
    candidate runs alone and records its own into ``scratch``.
    Returns (parity, score or None, the candidate's recorded outputs, timings of this run)."""
    encode = encoder(candidate_dir)
    prompts = [encode(p) for p in parity.PROMPTS]
    windows = ref_dir = None
    scored = scoring.eval.scored if scoring else 0
    if scoring:
        ref_dir = Path(scoring.reference)
        windows = make_windows(encode(scoring.text), scoring.eval.ctx, scoring.eval.max_windows)
    same = ref_dir is not None and ref_dir.resolve() == parent_dir.resolve()
    parent_out = outputs.reference(parent_dir, open_model(parent_dir), prompts=prompts, greedy_tokens=greedy_tokens,
                                   windows=windows if same else None, scored=scored,
                                   label=f"{label}: parent {parent_dir.name}")
    ref_out = parent_out if same else (outputs.reference(ref_dir, open_model(ref_dir), windows=windows, scored=scored,
                                                         label=f"{label}: reference {ref_dir.name}")
                                       if ref_dir is not None else None)
    info(f"{label}: running the new artifact on {len(prompts)} prompts"
         + (f" and {len(windows)} eval windows ..." if windows is not None else " ..."))
    model = open_model(candidate_dir)()
    mine = {"prompts": outputs.record_prompts(model, prompts, greedy_tokens, scratch / outputs.prompts_key(
        prompts, greedy_tokens))}
    if windows is not None:
        mine["windows"] = outputs.record_windows(model, windows, scratch / outputs.windows_key(windows, scored),
                                                 label=f"{label} eval", scored=scored)
    del model
    result = outputs.compare_prompts(mine["prompts"], parent_out["prompts"])
    timings = {"decode_tok_s": result.pop("candidate_decode_tok_s")}
    scored = None
    if windows is not None:
        ref_manifest = verify(ref_dir, load=False)
        figures = outputs.compare_windows(mine["windows"], ref_out["windows"])
        if broken := metric_table.not_finite(figures):
            raise PipelineError(f"{label}: {'; '.join(broken)} against {ref_dir.name}: the artifact is not "
                                f"published (an overflow in its precision, or a kernel that returns NaN)")
        timings["eval_seconds"] = figures.pop("eval_seconds")
        scored = {"reference": ref_manifest["stage"], "reference_id": ref_manifest["artifact_id"],
                  "text_sha256": text_sha256(scoring.text), "max_windows": scoring.eval.max_windows,
                  **({"score_last": scoring.eval.score_last} if scoring.eval.score_last else {}),
                  "scorer": scorer_fingerprint(), **rounded(figures)}
        if ref_manifest["stage"] != "checkpoint":
            scored["size_ratio"] = round(model_bytes(candidate_dir) / model_bytes(ref_dir), SIGNIFICANT)
        if scoring.tasks and scoring.tasks.names:
            scored.update(task_figures(candidate_dir, ref_dir, scoring.tasks.names, scoring.text, scoring.tasks.docs,
                                       label))
            if broken := metric_table.not_finite(scored):
                raise PipelineError(f"{label}: {'; '.join(broken)}: the artifact is not published")
    return rounded(result), scored, mine, timings


def _recorded(manifest: dict, ref_manifest: dict | None, text: str, ev: Eval) -> dict | None:
    """The stage's own scoring, if it was against this reference, on this text, with these settings,
    by this code (:func:`scorer_fingerprint`)."""
    rec = manifest.get("metrics", {}).get("eval")
    if not rec or ref_manifest is None:
        return None
    same = (rec.get("reference_id") == ref_manifest["artifact_id"] and rec.get("text_sha256") == text_sha256(text)
            and (rec.get("ctx"), rec.get("max_windows"), rec.get("score_last", 0)) == (ev.ctx, ev.max_windows,
                                                                                    ev.score_last)
            and rec.get("scorer") == scorer_fingerprint())
    return rec if same else None


def evaluate_artifact(artifact: str | Path, eval_text: str, params, reference: str | Path | None = None,
                      name: str | None = None, provider: str = "cpu", rescore: bool = False,
                      tasks: list[str] | None = None) -> dict:
    """Score ``artifact`` on ``eval_text``; against ``reference`` (an ONNX artifact, or the checkpoint
    = PyTorch) also drift, KL divergence and top-1 agreement; then apply ``budgets.<name>``.

    A stage that scored its artifact when building it (``metrics.eval`` in the manifest) against the same
    reference, text and settings, by the same scoring code, is not scored again (``rescore`` forces it).
    ``params``: the checked params (their ``eval`` and ``budgets``)."""
    artifact = Path(artifact)
    manifest = verify(artifact, load=False)  # opening the Runtime's session is the load check
    ref_manifest = verify(reference, load=False) if reference else None
    ep = params.eval
    name = name or artifact.name
    metrics = None if rescore else _recorded(manifest, ref_manifest, eval_text, ep)
    if metrics is not None:
        info(f"evaluate {name}: figures recorded when the stage built it (same reference {ref_manifest['artifact_id']}, "
             f"text, eval params and scoring code); --rescore measures again")
        metrics = {k: v for k, v in metrics.items() if k not in ("reference", "reference_id", "text_sha256", "scorer")}
        recorded_tasks = {k: metrics.pop(k) for k in TASK_KEYS if k in metrics}
    else:
        # Each model runs alone and its outputs are kept beside it (pipeline/scoring/outputs.py): the
        # reference's are reused by every artifact scored against it.
        import tempfile

        windows = make_windows(encoder(artifact)(eval_text), ep.ctx, ep.max_windows)
        ref = (outputs.reference(reference, open_model(Path(reference)), windows=windows, scored=ep.scored,
                                 label=f"evaluate {name}: reference")["windows"] if ref_manifest else None)
        with tempfile.TemporaryDirectory(prefix="evaluate-") as tmp:
            if rescore or provider != "cpu":  # measured now, on this provider, not taken from the cache
                model = Runtime(artifact, provider=provider)
                cand = outputs.record_windows(model, windows, Path(tmp) / "w", label=f"evaluate {name}", scored=ep.scored)
                del model
            else:
                cand = outputs.reference(artifact, open_model(artifact), windows=windows, scored=ep.scored,
                                         label=f"evaluate {name}")["windows"]
            metrics = outputs.compare_windows(cand, ref)
            metrics.pop("eval_seconds")
            metrics = rounded(metrics)
        recorded_tasks = {}
    size = model_bytes(artifact)
    if ref_manifest is not None and ref_manifest["stage"] != "checkpoint":
        ratio = round(size / model_bytes(Path(reference)), SIGNIFICANT)
    else:
        ratio = 1.0
    metrics = {"artifact": name, "artifact_id": manifest["artifact_id"], "stage": manifest["stage"],
               "reference": (ref_manifest or {}).get("stage"), **metrics, "size_bytes": size, "size_ratio": ratio,
               **parity_metrics(manifest)}
    if tasks and recorded_tasks.get("tasks_asked") == {"names": list(tasks), "docs": params.tasks.docs}:
        info(f"evaluate {name}: task figures recorded when the stage built it (same tasks, documents and reference)")
        metrics.update(recorded_tasks)
    elif tasks:
        metrics.update(task_figures(artifact, reference if ref_manifest else None, tasks, eval_text, params.tasks.docs,
                                    name))
    broken = metric_table.not_finite(metrics)
    metrics["budget"] = (check_budget(metrics, params.budgets.get(name)) if reference or broken else
                         {"status": "not checked (no --reference)", "violations": []})
    return metrics


TASK_KEYS = ("tasks", "tasks_asked", "task_acc", "task_acc_drop")


def task_figures(artifact: Path, reference: Path | None, tasks: list[str], text: str, docs: int, name: str) -> dict:
    """lm-evaluation-harness on ``tasks`` (pipeline/scoring/tasks.py) for the artifact and its reference:
    each task's figure and stderr, their mean (``task_acc``) and its drop from the reference's."""
    try:
        from . import tasks as lm_tasks
    except ImportError as exc:
        raise PipelineError(f"task accuracy needs lm-evaluation-harness ({exc.name} is not installed): "
                            f"pip install 'lm-eval>=0.4.9,<0.5', or --tasks none") from None

    got = lm_tasks.run(artifact, tasks, text, docs, label=f"{name}: tasks")
    ref = {}
    if reference:  # the reference's figures are kept beside it: every artifact scored against it reuses them
        key = "tasks-" + hashlib.sha256(json.dumps([list(tasks), docs, text_sha256(text), scorer_fingerprint()])
                                        .encode()).hexdigest()[:16]
        ref = outputs.recorded_figures(reference, key, lambda: lm_tasks.run(reference, tasks, text, docs,
                                                                            label=f"{name}: reference tasks"),
                                       label=f"{name}: reference tasks")
    per_task = {t: {**f, **({"reference": ref[t]["value"]} if t in ref else {})} for t, f in got.items()}
    mean = float(np.mean([f["value"] for f in got.values()]))
    out = {"tasks": per_task, "tasks_asked": {"names": list(tasks), "docs": docs}, "task_acc": round(mean, 6)}
    if ref:
        out["task_acc_drop"] = round(float(np.mean([f["value"] for f in ref.values()])) - mean, 6)
    return out


# Budgets that only mean something for a trained model: not applied to a random-weight checkpoint.
TRAINED_ONLY = ("ppl_ratio_vs_unigram", "heldout_ppl", "ppl")


def check_budget(metrics: dict, budget: dict | None) -> dict:
    """Compare metrics with a budget: ``max_<metric>`` / ``min_<metric>`` keys (drift compared by its
    magnitude), plus ``report_only``. A budgeted metric that is absent is a violation too, and a figure
    that is not a finite number fails whatever the budget (metrics.not_finite)."""
    broken = metric_table.not_finite(metrics)
    if not budget:
        return {"status": "fail" if broken else "no budget", "violations": broken}
    violations, skipped, unmeasured = list(broken), [], []
    for key, limit in budget.items():
        bound, _, metric = key.partition("_")
        if bound not in ("max", "min") or not metric:
            continue
        if metrics.get("random_weights") and metric in TRAINED_ONLY:
            skipped.append(key)
            continue
        value = metrics.get(metric)
        if value is None and metric_table.BY_KEY[metric].on_request:
            unmeasured.append(key)
            continue
        if value is None:
            violations.append(f"{metric} missing")
            continue
        if any(line.startswith(f"{metric} is ") for line in broken):
            continue
        value = abs(value) if metric_table.BY_KEY[metric].by_magnitude else value
        if (bound == "max" and value > float(limit)) or (bound == "min" and value < float(limit)):
            violations.append(f"{metric} {metrics[metric]:.4g} {'>' if bound == 'max' else '<'} {limit}")
    status = "pass" if not violations else ("over budget (report-only)" if budget.get("report_only") else "fail")
    if broken:
        status = "fail"  # report_only relaxes a bound, never a figure that is not one
    if skipped:
        status += f" ({', '.join(skipped)} not applied: random weights)"
    if unmeasured:
        status += f" ({', '.join(unmeasured)} not applied: not measured, see its params section)"
    return {"status": status, "violations": violations, **budget}


def parity_metrics(manifest: dict) -> dict:
    """The stage's own parity check (vs PyTorch for the export, vs its parent otherwise), flattened."""
    m = manifest.get("metrics", {})
    parity = m.get("parity_vs_parent", m)
    out = {f"parity_{k}": parity[k] for k in ("max_abs_logit_delta", "greedy_match", "greedy_prefix_match",
                                              "batch_rows_prefix_match", "decode_positions",
                                              "decode_max_abs_logit_delta", "decode_kld_mean", "decode_top1_agreement")
           if k in parity}
    if out:
        out["parity_vs"] = mf.compared_with(manifest).lower()
    return out


def checkpoint_metrics(manifest: dict) -> dict:
    return {"artifact": "checkpoint", "artifact_id": manifest["artifact_id"], "stage": "checkpoint",
            "source": manifest["source"].get("model"), **manifest["metrics"]}
