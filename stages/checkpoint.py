"""Stage `checkpoint`: the model every later stage starts from.

``model.source`` is ``builtin:qwen3-tiny`` (a byte-level BPE tokenizer and a small Qwen3 trained here
on the data stage's train split; ``builtin:<family>-tiny`` trains another family's architecture), a local Hugging Face checkpoint directory, or a hub id (networked
machines only). The output is a self-contained HF directory saved with safetensors, plus a manifest
recording the source, its revision or file hashes, and the config.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field, field_validator, model_validator

from pipeline.checkpoints.builtin import builtin_family, train_pinned
from pipeline.checkpoints.importer import import_checkpoint
from pipeline.checkpoints.shapes import RANDOM_PREFIX, random_checkpoint
from pipeline.errors import PipelineError, first_line
from pipeline.runner import BuildResult, Inputs, Stage
from pipeline.schema import Eval, PosInt, Section
from pipeline.scoring.evaluate import checkpoint_metrics, make_windows, rounded, score


class Outliers(Section):
    """Outlier activation channels moved into the model without changing its function
    (pipeline/outliers.py): the hard case for quantization that real LLMs are and the built-in model
    is not. ``channels: 0`` = none."""
    channels: int = Field(0, ge=0)
    scale: float = Field(64.0, gt=1)
    seed: int = Field(0, ge=0)

    @field_validator("scale")
    @classmethod
    def _exact(cls, v: float) -> float:

        if 2.0 ** round(math.log2(v)) != v:
            raise ValueError("must be a power of two (so the float model stays the same function, exactly)")
        return v


class Model(Section):
    source: str = Field(min_length=1)
    revision: str = "main"
    # Pickled weights (pytorch_model.bin) can run arbitrary code when loaded: refused unless this says so.
    allow_unsafe_pickle_weights: bool = False
    # Code from the checkpoint's repository is never run unless this says so.
    trust_remote_code: bool = False
    outliers: Outliers = Outliers()


class Tokenizer(Section):
    vocab_size: int = Field(ge=260, le=1 << 20)  # the 256-byte alphabet + 3 special tokens, at least


class Train(Section):
    seed: int = Field(ge=0)
    hidden_size: int = PosInt
    intermediate_size: int = PosInt
    layers: int = PosInt
    heads: int = PosInt
    kv_heads: int = PosInt
    head_dim: int = Field(ge=2, multiple_of=2)
    max_position_embeddings: int = Field(ge=8)
    seq_len: int = Field(ge=8)
    batch_size: int = PosInt
    steps: int = PosInt
    lr: float = Field(gt=0, le=1)
    warmup: int = Field(ge=0)
    weight_decay: float = Field(ge=0)
    threads: int = PosInt
    cpu_code_path: Literal["avx2", "portable", "native"]

    @model_validator(mode="after")
    def _shapes(self):
        if self.heads % self.kv_heads:
            raise ValueError(f"heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")
        if self.seq_len > self.max_position_embeddings:
            raise ValueError(f"seq_len ({self.seq_len}) must not exceed max_position_embeddings "
                             f"({self.max_position_embeddings})")
        return self

class CheckpointConfig(Section):
    """The checkpoint stage reads four sections: where the model comes from, the built-in model's
    tokenizer and training, and the held-out scoring."""
    model: Model
    tokenizer: Tokenizer
    train: Train
    eval: Eval


def unigram_ppl(train_ids: np.ndarray, windows: np.ndarray, vocab: int, scored: int = 0) -> float:
    """Add-one unigram model from the train split, scored on the same tokens as the LM."""
    targets = windows[:, windows.shape[1] - (scored or windows.shape[1] - windows.shape[1] // 2):].reshape(-1)
    vocab = max(vocab, int(targets.max()) + 1)
    counts = np.bincount(train_ids, minlength=vocab).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(np.exp(-logp[targets].mean()))


def score_checkpoint(directory: Path, data_dir: Path, ev: Eval, trust_remote_code: bool = False) -> dict:
    """Held-out PPL of the checkpoint (PyTorch, llama.cpp-style windows) and of a unigram model from the
    train split with the same tokenizer, on the same tokens: is it a real model?

    Tokenizes with ``tokenizer.json`` through `tokenizers`, exactly as the reference runtime does."""
    from tokenizers import Tokenizer

    from pipeline.scoring.torch_ref import TorchModel
    from pipeline.text.sources import read_split

    tok = Tokenizer.from_file(str(directory / "tokenizer.json"))

    def encode(text: str) -> np.ndarray:
        return np.asarray(tok.encode(text, add_special_tokens=False).ids, dtype=np.int64)

    windows = make_windows(encode(read_split(data_dir, "eval")), ev.ctx, ev.max_windows)
    try:
        model = TorchModel(directory, trust_remote_code=trust_remote_code)
    except Exception as exc:  # transformers raises many types for unloadable checkpoints
        raise PipelineError(f"{directory} cannot be loaded with transformers ({type(exc).__name__}: "
                            f"{first_line(exc, 200)})") from None
    held_out = score(model, windows, label="held-out ppl", scored=ev.scored)
    uni = unigram_ppl(encode(read_split(data_dir, "train")), windows, tok.get_vocab_size(), ev.scored)
    return rounded({"heldout_ppl": held_out["ppl"], "unigram_ppl": uni, "ppl_ratio_vs_unigram": held_out["ppl"] / uni,
                    "eval_tokens_scored": held_out["tokens_scored"]})


def build(inputs: Inputs, cfg: CheckpointConfig, tmp: Path) -> BuildResult:
    """The built-in model trained, a random-weight real shape, or an imported checkpoint; scored on the
    data artifact's held-out split. The id covers only the params that shape the model for its source."""
    source, data_dir = cfg.model.source, inputs.dir
    if builtin_family(source):
        made = train_pinned(cfg, data_dir, tmp)
        covered = {"model": cfg.model, "tokenizer": cfg.tokenizer, "train": cfg.train}
    elif source.startswith(RANDOM_PREFIX):
        made = random_checkpoint(source, cfg, data_dir, tmp)
        covered = {"model": cfg.model, "tokenizer": cfg.tokenizer, "seed": cfg.train.seed}
    else:
        made = import_checkpoint(cfg.model, tmp)
        covered = {"model": cfg.model}
    if cfg.model.outliers.channels:
        from pipeline.outliers import inject

        o = cfg.model.outliers
        made["source"]["outliers"] = inject(tmp, o.channels, o.scale, o.seed)
        covered["model"] = cfg.model  # the outliers are part of what the id covers, whatever the source
    config = json.loads((tmp / "config.json").read_text())
    metrics = {**made["metrics"], **score_checkpoint(tmp, data_dir, cfg.eval, cfg.model.trust_remote_code)}
    params = {k: v.model_dump(mode="json") if hasattr(v, "model_dump") else v for k, v in covered.items()}
    return BuildResult(metrics=metrics, extra={"config": config}, run=made.get("run", {}), source=made["source"],
                       params=params)


def describe(manifest: dict, measured: dict) -> str:
    m = manifest["metrics"]
    what = (f"built-in Qwen3 {m['params_m']} M params trained {measured['train_seconds']:.0f} s"
            if "train_seconds" in measured else f"{manifest['source']['model']} ({manifest['size_bytes'] / 1e6:,.1f} MB)")
    note = " (random weights: this perplexity means nothing)" if m.get("random_weights") else ""
    return (f"checkpoint: {manifest['artifact_id']} {what}, held-out ppl {m['heldout_ppl']:.2f} vs unigram "
            f"{m['unigram_ppl']:.1f} (ratio {m['ppl_ratio_vs_unigram']:.3f}){note}, {measured['wall_seconds']:.0f} s, "
            f"peak RSS {measured['peak_rss_mb'] / 1024:.2f} GB")


STAGE = Stage(name="checkpoint", config=CheckpointConfig, build=build, parents=("data",), describe=describe,
              metrics=checkpoint_metrics,
              flags={"--source": ("model.source", "alias for -S model.source=...: builtin:qwen3-tiny (or llama-tiny, phi3-tiny ...), "
                                                  "random:qwen3-0.6b (or llama-3.2-1b, qwen2.5-0.5b ...), a local HF dir or a hub id")},
              summary="Hugging Face checkpoint (safetensors) the ONNX artifacts start from")
