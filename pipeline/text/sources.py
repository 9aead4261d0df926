"""Text sources, all read through `datasets` so any source plugs into the same place.

A source spec is one of:
- ``builtin:pydoc``: the documentation text every CPython install ships (``pydoc_data.topics``);
- a local file or directory of ``.txt``/``.md`` (paragraphs), ``.json``/``.jsonl``, ``.parquet`` or
  ``.csv`` files;
- a Hugging Face hub dataset name (``wikitext:wikitext-2-raw-v1`` picks a config), where the hub is
  reachable.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from pipeline.errors import PipelineError, first_line

BUILTIN = "builtin:pydoc"
LOCAL_BUILDERS = {".txt": "text", ".md": "text", ".text": "text", ".json": "json", ".jsonl": "json",
                  ".parquet": "parquet", ".csv": "csv"}
SPLITS = ("train", "calibration", "eval")


def _builtin_dataset():
    import pydoc_data.topics as topics

    import datasets

    names = sorted(topics.topics)
    return datasets.Dataset.from_dict({"title": names, "text": [topics.topics[n] for n in names]})


def load_text_dataset(spec: str, text_column: str = "text", split: str = "train"):
    """Return a `datasets.Dataset` with a string column ``text_column`` (one clear error otherwise)."""
    import datasets

    datasets.disable_progress_bars()
    if spec == BUILTIN:
        return _builtin_dataset()
    path = Path(spec).expanduser()
    if path.exists():
        files = sorted(p for p in path.rglob("*") if p.suffix in LOCAL_BUILDERS) if path.is_dir() else [path]
        if not files:
            raise PipelineError(f"text source {spec}: no .txt/.md/.json/.jsonl/.parquet/.csv files found")
        builders = {LOCAL_BUILDERS.get(p.suffix) for p in files}
        if None in builders or len(builders) != 1:
            raise PipelineError(f"text source {spec}: use files of one kind: .txt/.md, .json/.jsonl, .parquet or .csv")
        builder = builders.pop()
        if all(p.stat().st_size == 0 for p in files):
            raise PipelineError(f"text source {spec} is empty")
        kwargs = {"sample_by": "paragraph"} if builder == "text" else {}
        try:
            ds = datasets.load_dataset(builder, data_files=[str(p) for p in files], split="train", **kwargs)
        except Exception as exc:  # datasets raises many types for unreadable files
            raise PipelineError(f"text source {spec} could not be read as {builder}: {first_line(exc)}") from None
    elif "/" in spec or ":" in spec or spec.replace("-", "").replace("_", "").isalnum():
        if spec.startswith(("/", ".", "~")):
            raise PipelineError(f"text source {spec} does not exist")
        name, _, config = spec.partition(":")
        try:
            ds = datasets.load_dataset(name, config or None, split=split)
        except Exception as exc:
            raise PipelineError(
                f"text source {spec!r} is not a local path and could not be loaded from the Hugging Face hub "
                f"({type(exc).__name__}); offline, pass a local .txt/.jsonl/.parquet file instead") from None
    else:
        raise PipelineError(f"text source {spec!r} is neither a local path nor a dataset name")
    if text_column not in ds.column_names:
        raise PipelineError(f"text source {spec} has no column {text_column!r} (columns: "
                            f"{', '.join(ds.column_names)}); set calibration.text_column / data.text_column")
    return ds


def paragraphs(ds, text_column: str = "text") -> list[str]:
    """Non-empty, de-duplicated paragraphs in source order."""
    seen, out = set(), []
    for text in ds[text_column]:
        if not isinstance(text, str):
            continue
        for para in text.split("\n\n"):
            para = para.strip("\n")
            if para.strip() and para not in seen:
                seen.add(para)
                out.append(para)
    return out


def split_paragraphs(paras: list[str], fractions, seed: int) -> dict[str, list[str]]:
    """Deterministic split inside every document: each paragraph goes to one split by a hash of its text.
    ``fractions``: the checked ``data.fractions`` (they sum to 1: pipeline/schema.py).

    Identical paragraphs were already merged, so the splits never share text."""
    bounds, acc = [], 0.0
    for name in SPLITS:
        acc += float(getattr(fractions, name))
        bounds.append((name, acc))
    out = {name: [] for name in SPLITS}
    for para in paras:
        h = int.from_bytes(hashlib.sha256(f"{seed}:{para}".encode()).digest()[:8], "big") / 2**64
        for name, bound in bounds:
            if h < bound:
                out[name].append(para)
                break
        else:
            out[SPLITS[-1]].append(para)
    return out


def read_split(data_dir: str | Path, split: str) -> str:
    path = Path(data_dir) / f"{split}.txt"
    if not path.is_file():
        raise PipelineError(f"{path} not found: run the data stage first (dvc repro data)")
    return path.read_text()
