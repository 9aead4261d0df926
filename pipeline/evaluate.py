"""Perplexity, KL divergence and top-1 agreement, computed the way llama.cpp's perplexity tool does.

The held-out text is tokenized once and cut into non-overlapping windows of ``ctx`` tokens; only the
second half of each window is scored, so every scored token has at least ctx/2 tokens of context.
A *scorer* is anything with ``logits(ids) -> (T, V) float array``: the ONNX reference runtime or
the PyTorch model. Reference and candidate run window by window, so memory stays bounded.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import outputs
from .errors import PipelineError
from .outputs import log_softmax  # noqa: F401  (the one definition, re-exported)


def make_windows(ids: list[int] | np.ndarray, ctx: int, max_windows: int = 0) -> np.ndarray:
    ids = np.asarray(ids, dtype=np.int64)
    if ctx < 4:
        raise PipelineError(f"eval.ctx must be at least 4 (got {ctx})")
    n = len(ids) // ctx
    if n < 2:
        raise PipelineError(f"eval text has {len(ids)} tokens, shorter than two windows of eval.ctx={ctx}: "
                            f"give more held-out text or lower eval.ctx")
    if max_windows and max_windows > 0:
        n = min(n, max_windows)
    return ids[: n * ctx].reshape(n, ctx)


def score(candidate, windows: np.ndarray, reference=None, label: str = "eval") -> dict:
    """Perplexity of ``candidate`` (a scorer, already loaded); with ``reference`` also its PPL,
    KL(ref || cand) and top-1 agreement. Both record their outputs and are compared as in every stage
    (pipeline/outputs.py)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="score-") as tmp:
        cand = outputs.record_windows(candidate, windows, Path(tmp) / "candidate", label)
        ref = outputs.record_windows(reference, windows, Path(tmp) / "reference", f"{label} reference") \
            if reference is not None else None
        return outputs.compare_windows(cand, ref)


def model_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in Path(directory).glob("model.onnx*") if p.is_file())


def text_sha256(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()


def window_params(eval_params: dict) -> tuple[int, int]:
    """(ctx, max_windows) from the ``eval`` params (max_windows 0 = every window)."""
    return int(eval_params.get("ctx", 128)), int(eval_params.get("max_windows") or 0)


def _recorded(manifest: dict, ref_manifest: dict | None, text: str, eval_params: dict) -> dict | None:
    """The stage's own scoring, if it was against this reference, on this text, with these settings."""
    rec = manifest.get("metrics", {}).get("eval")
    if not rec or ref_manifest is None:
        return None
    same = (rec.get("reference_id") == ref_manifest["artifact_id"] and rec.get("text_sha256") == text_sha256(text)
            and (rec.get("ctx"), rec.get("max_windows")) == window_params(eval_params))
    return rec if same else None


def evaluate_artifact(artifact: str | Path, eval_text: str, params: dict, reference: str | Path | None = None,
                      name: str | None = None, provider: str = "cpu", rescore: bool = False) -> dict:
    """Score ``artifact`` on ``eval_text``; against ``reference`` (an ONNX artifact, or the checkpoint
    = PyTorch) also drift, KL divergence and top-1 agreement; then apply ``budgets.<name>``.

    A stage that scored its artifact when building it (``metrics.eval`` in the manifest) against the same
    reference, text and settings is not scored again (``rescore`` forces it)."""
    from .log import info
    from .verify import verify

    artifact = Path(artifact)
    manifest = verify(artifact, load=False)  # opening the Runtime's session is the load check
    ref_manifest = verify(reference, load=False) if reference else None
    ep = params.get("eval", {})
    name = name or artifact.name
    metrics = None if rescore else _recorded(manifest, ref_manifest, eval_text, ep)
    if metrics is not None:
        info(f"evaluate {name}: figures recorded when the stage built it (same reference {ref_manifest['artifact_id']}, "
             f"text and eval params); --rescore measures again")
        metrics = {k: v for k, v in metrics.items() if k not in ("reference", "reference_id", "text_sha256")}
    else:
        # Each model runs alone and its outputs are kept beside it (pipeline/outputs.py): the
        # reference's are reused by every artifact scored against it.
        import tempfile

        from .derive import encoder, open_model
        from .runtime import Runtime

        windows = make_windows(encoder(artifact)(eval_text), *window_params(ep))
        ref = (outputs.reference(reference, open_model(Path(reference)), windows=windows,
                                 label=f"evaluate {name}: reference")["windows"] if ref_manifest else None)
        with tempfile.TemporaryDirectory(prefix="evaluate-") as tmp:
            if rescore or provider != "cpu":  # measured now, on this provider, not taken from the cache
                model = Runtime(artifact, provider=provider)
                cand = outputs.record_windows(model, windows, Path(tmp) / "w", label=f"evaluate {name}")
                del model
            else:
                cand = outputs.reference(artifact, open_model(artifact), windows=windows,
                                         label=f"evaluate {name}")["windows"]
            metrics = outputs.compare_windows(cand, ref)
    size = model_bytes(artifact)
    if ref_manifest is not None and ref_manifest["stage"] != "checkpoint":
        ratio = size / model_bytes(Path(reference))
    else:
        ratio = 1.0
    metrics = {"artifact": name, "artifact_id": manifest["artifact_id"], "stage": manifest["stage"],
               "reference": (ref_manifest or {}).get("stage"), **metrics, "size_bytes": size, "size_ratio": ratio,
               "stage_seconds": manifest["metrics"].get("stage_seconds"),
               "stage_wall_seconds": manifest["metrics"].get("wall_seconds"),
               "stage_peak_rss_mb": manifest["metrics"].get("peak_rss_mb"), **parity_metrics(manifest)}
    from .store import peak_rss_mb

    metrics["evaluate_peak_rss_mb"] = peak_rss_mb()
    metrics["budget"] = (check_budget(metrics, (params.get("budgets") or {}).get(name)) if reference else
                         {"status": "not checked (no --reference)", "violations": []})
    return metrics


# Budgets that only mean something for a trained model: not applied to a random-weight checkpoint.
TRAINED_ONLY = ("ppl_ratio_vs_unigram", "heldout_ppl", "ppl")


def check_budget(metrics: dict, budget: dict | None) -> dict:
    """Compare metrics with a budget: ``max_<metric>`` / ``min_<metric>`` keys (drift compared by its
    magnitude), plus ``report_only``. A budgeted metric that is absent is a violation too."""
    if not budget:
        return {"status": "no budget", "violations": []}
    violations, skipped = [], []
    for key, limit in budget.items():
        bound, _, metric = key.partition("_")
        if bound not in ("max", "min") or not metric:
            continue
        if metrics.get("random_weights") and metric in TRAINED_ONLY:
            skipped.append(key)
            continue
        value = metrics.get(metric)
        if value is None:
            violations.append(f"{metric} missing")
            continue
        value = abs(value) if metric == "drift_pct" else value
        if (bound == "max" and value > float(limit)) or (bound == "min" and value < float(limit)):
            violations.append(f"{metric} {metrics[metric]:.4g} {'>' if bound == 'max' else '<'} {limit}")
    status = "pass" if not violations else ("over budget (report-only)" if budget.get("report_only") else "fail")
    if skipped:
        status += f" ({', '.join(skipped)} not applied: random weights)"
    return {"status": status, "violations": violations, **budget}


def parity_metrics(manifest: dict) -> dict:
    """The stage's own parity check (vs PyTorch for the export, vs its parent otherwise), flattened."""
    m = manifest.get("metrics", {})
    parity = m.get("parity_vs_parent", m)
    out = {f"parity_{k}": parity[k] for k in ("max_abs_logit_delta", "greedy_match", "greedy_prefix_match")
           if k in parity}
    if out:
        out["parity_vs"] = "pytorch" if manifest["stage"] == "export" else (manifest.get("lineage") or [{}])[0].get("stage")
    if "export_seconds" in m:
        out["export_seconds"] = m["export_seconds"]
    return out


def checkpoint_metrics(manifest: dict) -> dict:
    return {"artifact": "checkpoint", "artifact_id": manifest["artifact_id"], "stage": "checkpoint",
            "source": manifest["source"].get("model"), **manifest["metrics"]}
