"""Task accuracy through lm-evaluation-harness: any artifact, scored by our reference runtime, on lm-eval's
own tasks (multiple-choice log-likelihood, rolling log-likelihood, generation), so a quantized model is
judged as people who ship LLMs judge it, beside its KL divergence.

``ArtifactLM`` is an lm-eval model (its ``TemplateLM`` API, lm-eval 0.4.x), registered as
``pipeline-onnx``: lm-eval's own request building, tokenisation split and metrics, our runtime's logits.
Its choices mirror lm-eval's HF backend (end-of-text / beginning-of-text prefix tokens, the same
truncation), so the export scores what the PyTorch checkpoint scores under lm-eval's HF backend
(tests/test_tasks.py checks each choice's log-likelihood).

Offline, two local tasks are built from the held-out text (``local_tasks``): ``pipeline_cloze`` (pick a
line's last word among four, ``acc``) and ``pipeline_next_word`` (generate it, ``exact_match``). With a
network any task of lm-eval's registry runs the same way (``pipeline evaluate --tasks hellaswag``)."""

from __future__ import annotations

import json
import re
import tempfile
import time
from pathlib import Path

import numpy as np
from lm_eval import utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from pipeline.consumer.runtime import Runtime, special_token_id
from pipeline.errors import PipelineError
from pipeline.log import info

LOCAL = {"cloze": "pipeline_cloze", "next_word": "pipeline_next_word"}
# the figure each local task is judged by (lm-eval's key: metric,filter)
PRIMARY = {"pipeline_cloze": "acc,none", "pipeline_next_word": "exact_match,first_word"}
_WORD = re.compile(r"[A-Za-z]{3,}")


@register_model("pipeline-onnx")
class ArtifactLM(TemplateLM):
    """``pipeline lm-eval --model pipeline-onnx --model_args artifact=DIR ...`` (lm-eval's CLI with this
    module imported: lm-eval finds models by registry), or ``simple_evaluate(model=ArtifactLM(artifact=DIR), ...)``."""

    def __init__(self, artifact: str, threads: int | None = None, max_length: int | None = None, **_):
        super().__init__()
        self.rt = Runtime(artifact, threads=int(threads) if threads else None)
        self.dir = Path(artifact)
        eos = special_token_id(self.dir, "eos_token")
        self._eot = eos if eos is not None else min(self.rt.eos_ids, default=0)
        bos = special_token_id(self.dir, "bos_token")
        self._prefix = bos if bos is not None else self._eot
        self._max_length = int(max_length) if max_length else (self.rt.context or 2048)

    @property
    def eot_token_id(self) -> int:
        return self._eot

    @property
    def prefix_token_id(self) -> int:
        return self._prefix

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list[int]:
        return self.rt.encode(string)

    def tok_decode(self, tokens, **kwargs) -> str:
        return self.rt.decode(list(tokens))

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        out = []
        for _, context, continuation in requests:  # (the strings, their tokens)
            # as lm-eval's HF backend: the last max_length tokens of context + continuation, less the last
            ids = (list(context) + list(continuation))[-(self.max_length + 1):][:-1]
            n = len(continuation)
            logits = self.rt.logits(np.asarray(ids), last=n)[-n:].astype(np.float64)
            logp = logits - logits.max(-1, keepdims=True)
            logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
            target = np.asarray(continuation)
            out.append((float(logp[np.arange(n), target].sum()), bool((logp.argmax(-1) == target).all())))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        totals = []
        for (string,) in (r.args for r in requests):
            windows = [(None, *utils.make_disjoint_window(w)) for w in utils.get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)]
            totals.append(sum(ll for ll, _ in self._loglikelihood_tokens(windows)))
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False):
        out = []
        for context, gen_kwargs in (r.args for r in requests):
            kwargs = dict(gen_kwargs or {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            new = int(kwargs.get("max_gen_toks", 256))
            ids = self.tok_encode(context)[-(self.max_length - new):]
            text = self.tok_decode(self.rt.generate(ids, new))  # greedy, stops at the model's EOS
            for stop in until:
                text = text.split(stop)[0] if stop else text
            out.append(text)
        return out


def model_for(directory: str | Path):
    """The lm-eval model of ``directory``: our runtime for an ONNX artifact, lm-eval's own HF backend
    (PyTorch, float32, CPU) for the checkpoint."""
    directory = Path(directory)
    if not (directory / "model.onnx").is_file():  # (a stage's new artifact has no manifest yet)
        from lm_eval.models.huggingface import HFLM

        return HFLM(pretrained=str(directory), device="cpu", dtype="float32", batch_size=1)
    return ArtifactLM(artifact=str(directory))


def _lines(text: str) -> list[tuple[str, str]]:
    """(the line up to its last word, that word) for each line of 8+ words ending in a word of 3+ letters."""
    items = []
    for line in text.splitlines():
        line = line.strip()
        words = line.split()
        last = list(_WORD.finditer(line))
        if len(words) < 8 or not last or line[last[-1].end():].strip(" .,;:") != "":
            continue
        cut = last[-1]
        items.append((line[:cut.start()].rstrip(), cut.group()))
    return items


def local_tasks(text: str, dest: Path, docs: int, seed: int = 0) -> dict[str, str]:
    """Write the local tasks' data and lm-eval YAML into ``dest``; returns {short name: lm-eval task name}.
    Deterministic in (text, docs, seed): the same documents for every artifact scored."""
    import yaml

    items = _lines(text)
    if len(items) < 8:
        raise PipelineError(f"the held-out text has {len(items)} lines of 8+ words: too few for the local tasks")
    rng = np.random.default_rng(seed)
    picked = [items[i] for i in sorted(rng.choice(len(items), min(docs, len(items)), replace=False))]
    pool = sorted({w for _, w in items})
    cloze, nxt = [], []
    for context, word in picked:
        others = [w for w in pool if w.lower() != word.lower()]
        distractors = [others[i] for i in rng.choice(len(others), 3, replace=False)]
        label = int(rng.integers(4))
        choices = distractors[:label] + [word] + distractors[label:]
        cloze.append({"context": context, "choices": [" " + c for c in choices], "label": label})
        nxt.append({"context": context, "answer": word})
    dest.mkdir(parents=True, exist_ok=True)
    common = {"dataset_path": "json", "test_split": "test"}
    specs = {
        "pipeline_cloze": (cloze, {"output_type": "multiple_choice", "doc_to_text": "{{context}}",
                                   "doc_to_choice": "{{choices}}", "doc_to_target": "{{label}}",
                                   "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}]}),
        "pipeline_next_word": (nxt, {"output_type": "generate_until", "doc_to_text": "{{context}}",
                                     "doc_to_target": "{{answer}}",
                                     "generation_kwargs": {"until": ["\n"], "max_gen_toks": 6, "do_sample": False},
                                     "filter_list": [{"name": "first_word", "filter": [
                                         {"function": "regex", "regex_pattern": "([A-Za-z]+)"},
                                         {"function": "take_first"}]}],
                                     "metric_list": [{"metric": "exact_match", "aggregation": "mean",
                                                      "higher_is_better": True, "ignore_case": True}]}),
    }
    for name, (rows, spec) in specs.items():
        data = dest / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        config = {"task": name, **common, **spec,
                  "dataset_kwargs": {"data_files": {"test": str(data.resolve())},
                                     "cache_dir": str((dest / "hf-datasets").resolve())}}
        (dest / f"{name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return dict(LOCAL)


def lm_eval_cli(argv: list[str]) -> None:
    """lm-eval's command line on ``argv`` with ``pipeline-onnx`` registered (this module's import did it):
    lm-eval finds models only in its own package or in modules already imported, so its ``lm_eval``
    command alone cannot name ours (docs/stages.md)."""
    import sys

    from lm_eval.__main__ import cli_evaluate

    saved = sys.argv
    sys.argv = ["pipeline lm-eval", *argv]
    try:
        cli_evaluate()
    finally:
        sys.argv = saved


def run(directory: str | Path, tasks: list[str], text: str, docs: int, limit: int | None = None,
        label: str = "tasks") -> dict:
    """lm-eval's figures of ``directory`` on ``tasks`` (local short names or lm-eval task names):
    {task: {"metric", "value", "stderr", "docs"}}."""
    import contextlib
    import io
    import logging

    import datasets
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    names = [LOCAL.get(t, t) for t in tasks]
    # our progress lines instead of lm-eval's and datasets' bars and notes (lm-eval passes tqdm its own
    # `disable`, so its bars are caught on their way to stderr)
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    datasets.disable_progress_bars()
    with tempfile.TemporaryDirectory(prefix="lm-eval-") as tmp:
        local_tasks(text, Path(tmp), docs)
        manager = TaskManager(include_path=tmp, include_defaults=any(n not in PRIMARY for n in names))
        unknown = [n for n in names if n not in manager.all_tasks]
        if unknown:
            raise PipelineError(f"unknown task {unknown[0]!r}: use {', '.join(LOCAL)} (built from the held-out "
                                f"text) or an lm-eval task name")
        info(f"{label}: lm-evaluation-harness on {', '.join(names)} ...")
        t0 = time.perf_counter()
        try:
            model = model_for(directory)
            with contextlib.redirect_stderr(io.StringIO()):
                results = simple_evaluate(model=model, tasks=names, task_manager=manager, limit=limit,
                                          log_samples=False, bootstrap_iters=1000, random_seed=0, numpy_random_seed=0,
                                          torch_random_seed=0, fewshot_random_seed=0)["results"]
        except (ConnectionError, OSError) as exc:
            raise PipelineError(f"lm-eval could not load the tasks {', '.join(names)} ({type(exc).__name__}: "
                                f"{str(exc)[:120]}): a hub task needs the network; the local ones do not") from None
    out = {}
    for name in names:
        figures = results[name]
        key = PRIMARY.get(name) or next(k for k in figures if "," in k and "stderr" not in k and k != "alias")
        metric, _, filt = key.partition(",")
        stderr = figures.get(f"{metric}_stderr,{filt}")
        out[name] = {"metric": metric, "value": round(float(figures[key]), 6),
                     "stderr": round(float(stderr), 6) if isinstance(stderr, (int, float)) else None}
    info(f"  {label}: " + ", ".join(f"{n} {f['metric']} {f['value']:.2%}" for n, f in out.items())
         + f" ({time.perf_counter() - t0:.1f} s)")
    return out
