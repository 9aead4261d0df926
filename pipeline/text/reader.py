"""Calibration windows and the reader ORT's calibrators pull them from.

The reader builds every feed with the reference runtime's :meth:`GraphIO.feeds` (position ids,
attention mask, empty past of length 0 with the graph's KV shapes and dtypes): one feed builder for
evaluation, generation and calibration. ``set_range`` lets ORT calibrate in strides
(``CalibStridedMinMax``), so only one stride of intermediate outputs is alive at a time."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from onnxruntime.quantization import CalibrationDataReader
from pydantic import Field

from pipeline.consumer.runtime import GraphIO
from pipeline.errors import PipelineError
from pipeline.log import Progress, info
from pipeline.schema import PosInt, Section
from pipeline.text.sources import load_text_dataset, paragraphs


class TextWindows(Section):
    source: str = Field(min_length=1)
    text_column: str = Field(min_length=1)
    samples: int = PosInt
    seq_len: int = Field(ge=8)
    # ranges and statistics rounded to this many mantissa bits (pipeline/quant/rounding.py), so another
    # CPU's last bits give the same artifact; 0 = as ORT computed them
    round_bits: int = Field(4, ge=0, le=20)



# Text is tokenized in bounded pieces, whatever its line lengths: a calibration file with one 200 MB line
# (one paragraph) would otherwise be one encode call holding ~16x its size in token offsets.
PIECE_CHARS = 1 << 16
BATCH = 64


def pieces(paras: list[str]):
    """The paragraphs, each cut into pieces of at most PIECE_CHARS characters, in batches of BATCH."""
    batch = []
    for para in paras:
        for i in range(0, len(para), PIECE_CHARS):
            batch.append(para[i:i + PIECE_CHARS])
            if len(batch) == BATCH:
                yield batch
                batch = []
    if batch:
        yield batch


def calibration_windows(source: str, text_column: str, tokenizer_file: str | Path, samples: int, seq_len: int,
                        eos_id: int | None = None) -> np.ndarray:
    """Tokenize the source's paragraphs (EOS between them) and cut ``samples`` windows of ``seq_len``;
    tokenizing stops as soon as there are enough tokens."""
    from tokenizers import Tokenizer

    ds = load_text_dataset(source, text_column)
    paras = paragraphs(ds, text_column)
    if not paras:
        raise PipelineError(f"calibration source {source} is empty: it holds no text in column {text_column!r}")
    tok = Tokenizer.from_file(str(tokenizer_file))
    ids: list[int] = []
    need = samples * seq_len
    for batch in pieces(paras):
        for enc in tok.encode_batch(batch, add_special_tokens=False):
            ids.extend(enc.ids)
            if eos_id is not None:
                ids.append(eos_id)
        if len(ids) >= need:
            break
    if len(ids) < seq_len:
        raise PipelineError(f"calibration source {source} has {len(ids)} tokens, shorter than one window of "
                            f"calibration.seq_len={seq_len}: give more text or lower seq_len")
    n = min(samples, len(ids) // seq_len)
    if n < samples:
        info(f"note: calibration asked for {samples} windows of {seq_len} tokens; {source} gives {n}: using {n} "
             f"(give more text, or set calibration.samples to at most {n} to say so)")
    return np.asarray(ids[: n * seq_len], dtype=np.int64).reshape(n, seq_len)


def covered_params(config, windows: np.ndarray) -> dict:
    """``config`` as the artifact id covers it: the calibration text named by the digest of the token
    windows cut from it, not by its path. One text at two paths (DVC's relative path, a script's absolute
    one) makes one artifact; an edited file at the same path makes another. The path is still recorded,
    outside the id, in the manifest's figures."""
    params = config.model_dump(mode="json")
    cal = params["calibration"]
    del cal["source"], cal["text_column"]  # what they selected is in the digest
    cal["windows_sha256"] = hashlib.sha256(np.ascontiguousarray(windows, dtype=np.int64).tobytes()).hexdigest()
    return params


class CalibrationReader(CalibrationDataReader):
    def __init__(self, io: GraphIO, windows: np.ndarray, label: str = "calibrate"):
        self.io, self.windows = io, windows
        self.start, self.end, self.pos = 0, len(windows), 0
        self.progress = Progress(label, len(windows))

    def __len__(self) -> int:
        return len(self.windows)

    def set_range(self, start_index: int, end_index: int) -> None:
        self.start, self.end = start_index, min(end_index, len(self.windows))
        self.pos = self.start

    def rewind(self) -> None:
        self.pos = self.start

    def get_next(self) -> dict | None:
        if self.pos >= self.end:
            return None
        feeds = self.io.feeds(self.windows[self.pos][None])
        self.pos += 1
        self.progress.update(self.pos)
        return feeds
