"""A model's outputs, recorded once on disk, so that no two models are ever in memory together.

Parity and scoring compare a candidate with a reference. Instead of running both side by side, each
model runs alone and writes what the comparison needs (the way llama.cpp's ``--kl-divergence-base``
keeps the base model's log-probs):

- on the parity prompts: the prefill logits and a greedy continuation; the same prompts as one
  mixed-length batch (each row must get the tokens it gets alone); and the logits along the decode
  path (one token a step through the KV cache, as generation runs) over :data:`DECODE_POSITIONS`
  teacher-forced positions;
- on the eval windows: the logits of every scored position (the second half of each window), as
  float32, so the figures are exactly those of running both models side by side.

A published artifact's outputs are kept in ``.outputs/<artifact id>/`` beside it, so every artifact
derived from the same parent or scored against the same reference (fused, fp16, int8-*, int4 all
against the export) reuses them instead of loading that model again. Entries of artifacts that are no
longer there are pruned whenever a new entry is stored.
"""

from __future__ import annotations

import atexit
import functools
import gc
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

from pipeline.consumer import manifest as mf
from pipeline.consumer import untrusted
from pipeline.errors import PipelineError
from pipeline.log import Progress, info
from pipeline.scoring import metrics as metric_table
from pipeline.scoring.metrics import kl_divergence

# The modules whose code computes a score (evaluate.py, this one and what they run). A recorded output
# or figure is reused only if these files are byte for byte the ones that computed it;
# tests/test_architecture.py checks that the list covers evaluate's import closure.
SCORER_MODULES = ("pipeline.scoring.evaluate", "pipeline.scoring.outputs", "pipeline.consumer.runtime",
                  "pipeline.scoring.torch_ref", "pipeline.scoring.parity", "pipeline.consumer.verify",
                  "pipeline.consumer.manifest", "pipeline.consumer.untrusted", "pipeline.graph.onnx_io",
                  "pipeline.schema", "pipeline.registry", "pipeline.errors", "pipeline.log", "pipeline.ops.memory",
                  "pipeline.scoring.metrics", "pipeline.scoring.tasks", "pipeline.graph.decode")


@functools.lru_cache(maxsize=1)
def scorer_fingerprint() -> str:
    """sha256 over the source of :data:`SCORER_MODULES` (found, not imported): which code computed a score."""
    import importlib.util

    digest = hashlib.sha256()
    for name in SCORER_MODULES:
        digest.update(name.encode() + b"\0" + Path(importlib.util.find_spec(name).origin).read_bytes())
    return digest.hexdigest()[:16]


CACHE = ".outputs"
DECODE_POSITIONS = 256  # teacher-forced decode steps compared with the parent
DECODE_PREFIX = 8


def decode_ids(prompts: list[list[int]]) -> list[int]:
    """The decode path's token sequence: the parity prompts, concatenated and repeated."""
    flat = [t for p in prompts for t in p] or [0]
    need = DECODE_PREFIX + DECODE_POSITIONS - 1
    return (flat * (need // len(flat) + 1))[:need]


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def prompts_key(prompts: list[list[int]], greedy_tokens: int) -> str:
    blob = json.dumps({"prompts": prompts, "greedy_tokens": greedy_tokens, "decode_positions": DECODE_POSITIONS,
                       "batched": True, "scorer": scorer_fingerprint()}).encode()
    return "prompts-" + hashlib.sha256(blob).hexdigest()[:16]


def windows_key(windows: np.ndarray, scored: int = 0) -> str:
    """``scored``: tokens scored per window, when not the second half (keys of the default unchanged)."""
    half = windows.shape[1] - windows.shape[1] // 2
    # the shape too: 80 windows of 128 and 20 of 512 cut from one token stream are the same bytes
    blob = (f"{windows.shape[0]}x{windows.shape[1]}:".encode() + np.ascontiguousarray(windows, dtype=np.int64).tobytes()
            + (f"scored={scored}".encode() if scored and scored != half else b"") + scorer_fingerprint().encode())
    return "windows-" + hashlib.sha256(blob).hexdigest()[:16]


class Recorded:
    """Outputs written by :func:`record_prompts` or :func:`record_windows`. Its meta.json lists every file
    with its sha256, checked when it is opened: a cache entry that was changed or truncated on disk is
    refused (:class:`Damaged`), never read as a model's outputs."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        try:
            self.meta = untrusted.load_json(self.dir / "meta.json", "recorded outputs")
            files = self.meta.get("files")
            if not isinstance(files, dict) or not files:
                raise Damaged(f"{self.dir}: meta.json lists no files")
            present = {p.name for p in self.dir.iterdir()} - {"meta.json"}
            if present != set(files):
                raise Damaged(f"{self.dir}: holds {sorted(present ^ set(files))[:3]} unlike its meta.json")
            for name, digest in files.items():
                if mf.sha256_file(untrusted.regular(self.dir / name, "recorded output")) != digest:
                    raise Damaged(f"{self.dir}/{name} does not match its sha256")
        except PipelineError as exc:
            raise Damaged(str(exc)) from None

    def prompt_logits(self, i: int) -> np.ndarray:
        return np.load(self.dir / f"prompt_{i}.npy")

    def greedy(self, i: int) -> list[int]:
        return self.meta["greedy"][i]

    def decode_logits(self) -> np.ndarray | None:
        path = self.dir / "decode.npy"
        return np.load(path) if path.is_file() else None

    def window_logprobs(self, i: int) -> np.ndarray:
        return log_softmax(np.load(self.dir / f"window_{i}.npy"))


class Damaged(PipelineError):
    """A recorded-outputs entry that does not match what was recorded."""


def _write(dest: Path, fill: Callable[[Path], dict]) -> Recorded:
    """Write into a temp dir beside ``dest`` and rename it into place: never a half-written entry. The
    meta lists each file's sha256, so a later read can tell the entry is the one written."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.tmp-", suffix=f"-{os.getpid()}"))
    try:
        meta = fill(tmp)
        meta["files"] = {p.name: mf.sha256_file(p) for p in sorted(tmp.iterdir())}
        (tmp / "meta.json").write_text(json.dumps(meta))
        if dest.exists():  # written meanwhile by another run: same content
            shutil.rmtree(tmp)
        else:
            tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Recorded(dest)


def _intact(entry: Path) -> Recorded | None:
    """The recorded outputs at ``entry`` if they are there and check out; a damaged entry is removed
    (and so recorded again) with a note."""
    if not entry.exists():
        return None
    try:
        return Recorded(entry)
    except Damaged as exc:
        info(f"note: recorded outputs damaged ({exc}): removed, the model runs again")
        shutil.rmtree(entry, ignore_errors=True)
        return None


def record_prompts(model, prompts: list[list[int]], greedy_tokens: int, dest: Path) -> Recorded:
    """Prefill logits and ``greedy_tokens`` greedy tokens of ``model`` on each prompt; the greedy
    decode rate is kept too (the candidate's decode speed in its manifest)."""
    def fill(tmp: Path) -> dict:
        greedy, greedy_s = [], 0.0
        for i, ids in enumerate(prompts):
            np.save(tmp / f"prompt_{i}.npy", np.asarray(model.logits(np.asarray(ids)), dtype=np.float32))
            t0 = time.perf_counter()
            greedy.append([int(t) for t in model.greedy(list(ids), greedy_tokens)])
            greedy_s += time.perf_counter() - t0
        meta = {"prompts": prompts, "greedy_tokens": greedy_tokens, "greedy": greedy,
                "decode_tok_s": round(greedy_tokens * len(prompts) / greedy_s, 1) if greedy_s > 0 else None}
        np.save(tmp / "decode.npy", model.decode_path_logits(decode_ids(prompts), DECODE_PREFIX))
        if hasattr(model, "generate_batch"):  # the ONNX runtime (PyTorch's reference runs prompts alone)
            batched = model.generate_batch([list(p) for p in prompts], greedy_tokens, stop_at_eos=False)
            meta["batched"] = [[int(t) for t in row] for row in batched]
        return meta
    return _write(dest, fill)


def record_windows(model, windows: np.ndarray, dest: Path, label: str, scored: int = 0) -> Recorded:
    """Logits of the scored positions of every window (float32, as the model returns them): the second
    half, or the last ``scored`` tokens. The model computes the lm_head there only, in chunks
    (``logits(ids, last=...)``), so a 32k window costs the scored rows, not 32k x vocab."""
    ctx = windows.shape[1]
    first = ctx - scored if scored else ctx // 2

    def fill(tmp: Path) -> dict:
        progress = Progress(label, len(windows))
        for i, win in enumerate(windows):
            rows = model.logits(win, last=ctx - first + 1)[:-1]  # predicting tokens first .. ctx-1
            np.save(tmp / f"window_{i}.npy", np.asarray(rows, dtype=np.float32))
            progress.update(i + 1)
        np.save(tmp / "windows.npy", windows)
        return {"windows": int(len(windows)), "ctx": int(ctx), "scored": int(ctx - first),
                "seconds": round(progress.elapsed, 2)}
    return _write(dest, fill)


def cache_dir(artifact_dir: str | Path) -> Path:
    """``.outputs`` beside the artifact, or ``$PIPELINE_OUTPUTS_DIR``: `pipeline tune` points every DVC
    experiment's workspace at the project's own, so the reference is recorded once for all candidates
    (entries are keyed by artifact id, so a shared one can only hold the same model's outputs)."""
    shared = os.environ.get("PIPELINE_OUTPUTS_DIR")
    return Path(shared) if shared else Path(artifact_dir).resolve().parent / CACHE


def _artifact_id(artifact_dir: Path) -> str:
    """The id of the artifact at ``artifact_dir`` (verified by whoever asks for its outputs)."""
    return mf.read_manifest(artifact_dir)["artifact_id"]


def reference(artifact_dir: str | Path, open_model: Callable[[], object], *, prompts: list[list[int]] | None = None,
              greedy_tokens: int = 0, windows: np.ndarray | None = None, scored: int = 0,
              label: str = "reference") -> dict:
    """The recorded outputs of the published artifact at ``artifact_dir``: read from its cache, or
    recorded now by the model ``open_model()`` returns, which is freed before this returns.
    Returns {"prompts": Recorded | None, "windows": Recorded | None}."""
    artifact_dir = Path(artifact_dir)
    entry = cache_dir(artifact_dir) / _artifact_id(artifact_dir)

    def wanted_in(entry: Path) -> dict:
        return ({"prompts": entry / prompts_key(prompts, greedy_tokens)} if prompts is not None else {}) | (
            {"windows": entry / windows_key(windows, scored)} if windows is not None else {})

    wanted = wanted_in(entry)
    found = {k: _intact(p) for k, p in wanted.items()}
    missing = [k for k, rec in found.items() if rec is None]
    if missing and not _writable(entry):  # a read-only store: recorded for this run only
        entry = Path(tempfile.mkdtemp(prefix="outputs-"))
        atexit.register(shutil.rmtree, entry, True)
        wanted = wanted_in(entry)
    if missing:
        info(f"{label}: recording its outputs ({' and '.join(missing)}) once, in {entry}")
        model = None
        try:
            model = open_model()
            if "prompts" in missing:
                found["prompts"] = record_prompts(model, prompts, greedy_tokens, wanted["prompts"])
            if "windows" in missing:
                found["windows"] = record_windows(model, windows, wanted["windows"], label=f"{label} outputs",
                                                  scored=scored)
        finally:
            del model
            gc.collect()
        prune(cache_dir(artifact_dir))
    else:
        info(f"{label}: outputs recorded earlier ({entry}), the model is not loaded again")
    return found | {k: None for k in ("prompts", "windows") if k not in wanted}


def recorded_figures(artifact_dir: str | Path, key: str, compute: Callable[[], dict], label: str) -> dict:
    """Figures of the published artifact at ``artifact_dir`` (its task accuracy) computed once and kept in its
    cache entry as ``<key>.json`` (the key covers what they depend on); a file that is not a mapping of
    finite figures is computed again."""
    artifact_dir = Path(artifact_dir)
    entry = cache_dir(artifact_dir) / _artifact_id(artifact_dir)
    path = entry / f"{key}.json"
    if path.is_file():
        try:
            found = untrusted.load_json(path, "recorded figures")
            if isinstance(found, dict) and found and all(
                    isinstance(f, dict) and untrusted.finite_number(f.get("value")) for f in found.values()):
                info(f"{label}: recorded earlier ({path})")
                return found
        except PipelineError:
            pass
        info(f"note: recorded figures damaged ({path}): computed again")
    figures = compute()
    if _writable(entry):
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(figures))
        os.replace(tmp, path)
    return figures


def _writable(entry: Path) -> bool:
    try:
        entry.mkdir(parents=True, exist_ok=True)
        return os.access(entry, os.W_OK)
    except OSError:
        return False


def keep(recorded: dict, artifact_dir: str | Path) -> None:
    """Store a freshly published artifact's own recorded outputs (made in its staging area) in the
    cache, so artifacts derived from it or scored against it reuse them."""
    artifact_dir = Path(artifact_dir)
    try:
        entry = cache_dir(artifact_dir) / _artifact_id(artifact_dir)
        entry.mkdir(parents=True, exist_ok=True)
        for rec in recorded.values():
            if rec is not None and not (entry / rec.dir.name).exists():
                shutil.copytree(rec.dir, entry / f".{rec.dir.name}.tmp-{os.getpid()}")
                os.replace(entry / f".{rec.dir.name}.tmp-{os.getpid()}", entry / rec.dir.name)
        prune(cache_dir(artifact_dir))
    except OSError as exc:  # a read-only store: the outputs are only not reused
        info(f"note: outputs not cached beside {artifact_dir} ({exc.strerror})")


def prune(cache: Path) -> None:
    """Drop the entries of artifacts that are no longer beside the cache (rebuilt or removed), and
    temp dirs of killed runs."""
    if not cache.is_dir():
        return
    live = set()
    for d in cache.parent.iterdir():
        try:
            live.add(_artifact_id(d))
        except (OSError, PipelineError):  # not an artifact, or a malformed one: not ours to judge here
            continue
    for entry in cache.iterdir():
        if entry.name not in live:
            shutil.rmtree(entry, ignore_errors=True)
            continue
        for sub in entry.iterdir():
            if ".tmp-" in sub.name and not _alive(sub.name):
                shutil.rmtree(sub, ignore_errors=True)


def _alive(name: str) -> bool:
    """Is the run that made the temp dir ``name`` (ending in ``-<pid>``) still running?"""
    pid = name.rsplit("-", 1)[-1]
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
        return True
    except OSError:
        return False


def compare_prompts(candidate: Recorded, ref: Recorded) -> dict:
    """Parity: max |delta logit| on the prompts' prefill and greedy-token agreement."""
    max_delta, matched, total, identical = 0.0, 0, 0, True
    n = ref.meta["greedy_tokens"]
    for i in range(len(ref.meta["prompts"])):
        a, b = candidate.prompt_logits(i), ref.prompt_logits(i)
        max_delta = max(max_delta, float(np.abs(a.astype(np.float64) - b).max()))
        ga, gb = candidate.greedy(i), ref.greedy(i)
        matched += next((j for j, (x, y) in enumerate(zip(ga, gb)) if x != y), len(ga))
        total += n
        identical &= ga == gb
    out = {"max_abs_logit_delta": max_delta, "greedy_tokens": n, "greedy_prompts": len(ref.meta["prompts"]),
           "greedy_match": identical, "greedy_prefix_match": matched / total if total else 1.0,
           "candidate_decode_tok_s": candidate.meta.get("decode_tok_s")}
    if "batched" in candidate.meta:  # the mixed-length batch against the same prompts run alone
        alone, batched = candidate.meta["greedy"], candidate.meta["batched"]
        same = sum(next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), len(a)) for a, b in zip(alone, batched))
        out["batch_rows_prefix_match"] = same / sum(len(a) for a in alone) if alone else 1.0
    mine, theirs = candidate.decode_logits(), ref.decode_logits()
    if mine is not None and theirs is not None:  # the decode path, position by position
        kld, delta = [], 0.0
        for i in range(0, len(mine), 16):  # 16 positions at a time: a 151,936-token vocab in float64 is large
            a, b = mine[i:i + 16], theirs[i:i + 16]
            kld.append(kl_divergence(log_softmax(b), log_softmax(a)))
            delta = max(delta, float(np.abs(a.astype(np.float64) - b).max()))
        kld = np.concatenate(kld)
        out.update({"decode_positions": int(len(mine)), "decode_max_abs_logit_delta": delta,
                    "decode_kld_mean": float(kld.mean()), "decode_kld_max": float(kld.max()),
                    "decode_top1_agreement": float((mine.argmax(-1) == theirs.argmax(-1)).mean())})
    return out


def compare_windows(candidate: Recorded, ref: Recorded | None) -> dict:
    """Perplexity of the candidate; with ``ref`` also its PPL, KL(ref || cand) and top-1 agreement: the
    scored metrics of pipeline/scoring/metrics.py's table. The scored token ids are the second half of the
    windows the candidate recorded."""
    windows = np.load(candidate.dir / "windows.npy")
    ctx = windows.shape[1]
    targets = windows[:, ctx - candidate.meta.get("scored", ctx - ctx // 2):]
    per_window = ((candidate.window_logprobs(i), ref.window_logprobs(i) if ref is not None else None, tgt)
                  for i, tgt in enumerate(targets))
    scored = metric_table.score(per_window, ref is not None)
    return {"ppl": scored.pop("ppl"), "tokens_scored": int(targets.size), "windows": int(len(targets)),
            "ctx": int(windows.shape[1]), "eval_seconds": candidate.meta["seconds"], **scored}
