"""Stage `checkpoint`: the model every later stage starts from.

``model.source`` is ``builtin:qwen3-tiny`` (a byte-level BPE tokenizer and a small Qwen3 trained here
on the data stage's train split), a local Hugging Face checkpoint directory, or a hub id (networked
machines only). The output is a self-contained HF directory saved with safetensors, plus a manifest
recording the source, its revision or file hashes, and the config.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field, field_validator, model_validator

from pipeline import manifest as mf
from pipeline.child import in_child
from pipeline.errors import PipelineError
from pipeline.evaluate import checkpoint_metrics, make_windows, rounded, score
from pipeline.log import info
from pipeline.memory import check as check_memory
from pipeline.runner import BuildResult, Inputs, Stage
from pipeline.schema import Eval, PosInt, Section


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
        import math

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


BUILTIN = "builtin:qwen3-tiny"
EOS = "<|endoftext|>"
# Qwen's chat markers, special tokens of the built-in tokenizer as of Qwen3's, so the chat path
# (`pipeline generate --chat`) runs on the default model exactly as on Qwen3-4B-Instruct.
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
# A minimal Qwen-style (ChatML) template: the shape of Qwen3-Instruct-2507's, without tools.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# Files copied from a local or hub checkpoint; weights only as safetensors (never pickle).
CHECKPOINT_PATTERNS = ("*.json", "*.safetensors", "tokenizer.model", "merges.txt", "vocab.json", "*.txt")


# ---------------------------------------------------------------------------------------------- builtin
def train_tokenizer(text: str, vocab_size: int, out_dir: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS, IM_START, IM_END], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(text.split("\n\n"), trainer=trainer)
    # What a Qwen3 tokenizer_config.json declares, where it applies: its real inputs (no
    # token_type_ids, which optimum's generate() would refuse), no BOS, EOS/pad <|endoftext|>, the chat
    # template, and no clean-up of spaces on decode.
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS, bos_token=None,
                                 model_input_names=["input_ids", "attention_mask"], chat_template=CHAT_TEMPLATE,
                                 clean_up_tokenization_spaces=False, split_special_tokens=False,
                                 additional_special_tokens=[IM_START, IM_END])
    hf.model_max_length = 1 << 30
    hf.save_pretrained(str(out_dir))
    return hf


def encode_text(tokenizer, text: str) -> np.ndarray:
    """The text tokenized once, as evaluation does (llama.cpp style): train and score the same stream."""
    return np.asarray(tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids, dtype=np.int64)


def unigram_ppl(train_ids: np.ndarray, windows: np.ndarray, vocab: int, scored: int = 0) -> float:
    """Add-one unigram model from the train split, scored on the same tokens as the LM."""
    targets = windows[:, windows.shape[1] - (scored or windows.shape[1] - windows.shape[1] // 2):].reshape(-1)
    vocab = max(vocab, int(targets.max()) + 1)
    counts = np.bincount(train_ids, minlength=vocab).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(np.exp(-logp[targets].mean()))


def train_builtin(cfg: CheckpointConfig, data_dir: Path, tmp: Path) -> dict:
    import torch
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    from calibration.sources import read_split

    tp = cfg.train
    seed = tp.seed
    torch.manual_seed(seed)
    torch.set_num_threads(tp.threads)
    torch.use_deterministic_algorithms(True)
    train_text = read_split(data_dir, "train")

    t0 = time.perf_counter()
    tokenizer = train_tokenizer(train_text, cfg.tokenizer.vocab_size, tmp)
    train_ids = encode_text(tokenizer, train_text)
    info(f"checkpoint: tokenizer {len(tokenizer)} tokens; train {len(train_ids):,} tokens "
         f"({time.perf_counter() - t0:.1f} s)")

    config = Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=tp.hidden_size, intermediate_size=tp.intermediate_size,
        num_hidden_layers=tp.layers, num_attention_heads=tp.heads, num_key_value_heads=tp.kv_heads,
        head_dim=tp.head_dim, max_position_embeddings=tp.max_position_embeddings, rope_theta=10000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=True, bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id, attention_dropout=0.0, use_cache=True,
        torch_dtype="float32",
    )
    model = Qwen3ForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    info(f"checkpoint: Qwen3 {config.num_hidden_layers} layers x {config.hidden_size}, "
         f"{config.num_attention_heads} heads / {config.num_key_value_heads} KV heads, {n_params / 1e6:.2f} M params")

    steps, bs, seq = tp.steps, tp.batch_size, tp.seq_len
    warmup, lr = tp.warmup, tp.lr
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": tp.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, warmup)) * (
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / max(1, steps))))))
    rng = np.random.default_rng(seed)
    data = torch.as_tensor(train_ids)
    model.train()
    t0 = last = time.perf_counter()
    loss_ema = None
    for step in range(1, steps + 1):
        starts = rng.integers(0, len(train_ids) - seq - 1, size=bs)
        batch = torch.stack([data[s: s + seq + 1] for s in starts])
        loss = model(input_ids=batch, labels=batch).loss  # HF shifts the labels by one internally
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        lv = loss.item()
        loss_ema = lv if loss_ema is None else 0.95 * loss_ema + 0.05 * lv
        now = time.perf_counter()
        if now - last >= 5 or step == steps:
            last = now
            rate = step * bs * seq / (now - t0)
            info(f"  train step {step}/{steps} loss {loss_ema:.3f} ({rate:,.0f} tok/s, "
                 f"eta {(steps - step) * (now - t0) / step:.0f} s)")
    train_s = time.perf_counter() - t0
    model.eval()
    # As Qwen3-Instruct's generation_config: a turn ends at <|im_end|> or <|endoftext|>.
    model.generation_config = GenerationConfig(eos_token_id=[tokenizer.eos_token_id,
                                                             tokenizer.convert_tokens_to_ids(IM_END)],
                                               pad_token_id=tokenizer.eos_token_id, do_sample=False)
    model.save_pretrained(str(tmp), safe_serialization=True)

    return {
        "source": {"model": BUILTIN, "data_id": _data_id(data_dir)},
        "metrics": {"params_m": round(n_params / 1e6, 3), "train_tokens": steps * bs * seq,
                    "final_loss": round(loss_ema, 4)},
        "run": {"train_seconds": round(train_s, 1)},
    }


def score_checkpoint(directory: Path, data_dir: Path, ev: Eval, trust_remote_code: bool = False) -> dict:
    """Held-out PPL of the checkpoint (PyTorch, llama.cpp-style windows) and of a unigram model from the
    train split with the same tokenizer, on the same tokens: is it a real model?

    Tokenizes with ``tokenizer.json`` through `tokenizers`, exactly as the reference runtime does."""
    from tokenizers import Tokenizer

    from calibration.sources import read_split
    from pipeline.torch_ref import TorchModel

    tok = Tokenizer.from_file(str(directory / "tokenizer.json"))

    def encode(text: str) -> np.ndarray:
        return np.asarray(tok.encode(text, add_special_tokens=False).ids, dtype=np.int64)

    windows = make_windows(encode(read_split(data_dir, "eval")), ev.ctx, ev.max_windows)
    try:
        model = TorchModel(directory, trust_remote_code=trust_remote_code)
    except Exception as exc:  # transformers raises many types for unloadable checkpoints
        raise PipelineError(f"{directory} cannot be loaded with transformers ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0][:200]})") from None
    held_out = score(model, windows, label="held-out ppl", scored=ev.scored)
    uni = unigram_ppl(encode(read_split(data_dir, "train")), windows, tok.get_vocab_size(), ev.scored)
    return rounded({"heldout_ppl": held_out["ppl"], "unigram_ppl": uni, "ppl_ratio_vs_unigram": held_out["ppl"] / uni,
                    "eval_tokens_scored": held_out["tokens_scored"]})


def _data_id(data_dir: Path) -> str | None:
    try:
        return mf.read_manifest(data_dir)["artifact_id"]
    except PipelineError:
        return None


# ---------------------------------------------------------------------------------------------- random
# The published Qwen3 shapes (config.json of Qwen/Qwen3-0.6B, -1.7B and Qwen3-4B-Instruct-2507): real
# sizes offline, with random weights. Every one ties its embedding and has the real 151,936-token vocab.
QWEN3_SHAPES = {
    "qwen3-0.6b": {"hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 28, "num_attention_heads": 16,
                   "num_key_value_heads": 8, "max_position_embeddings": 40960, "rope_theta": 1_000_000.0},
    "qwen3-1.7b": {"hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 28, "num_attention_heads": 16,
                   "num_key_value_heads": 8, "max_position_embeddings": 40960, "rope_theta": 1_000_000.0},
    "qwen3-4b": {"hidden_size": 2560, "intermediate_size": 9728, "num_hidden_layers": 36, "num_attention_heads": 32,
                 "num_key_value_heads": 8, "max_position_embeddings": 262144, "rope_theta": 5_000_000.0},
}
# Not a published shape: a 2-layer Qwen3 small enough to test long contexts (8k+) in the test suite,
# with the built-in tokenizer's vocab.
QWEN3_SHAPES["qwen3-micro"] = {"hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 2,
                               "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
                               "max_position_embeddings": 32768, "rope_theta": 1_000_000.0, "vocab_size": None}
QWEN3_VOCAB = 151936
RANDOM_PREFIX = "random:"
RANDOM_QUERY = ("?layers=N, &context=N (max_position_embeddings), &yarn=F (rope_scaling YaRN by F over context / F), "
                "&dtype=bfloat16|float16 (stored as the hub stores it)")


def parse_random(source: str) -> tuple[str, dict]:
    """``random:qwen3-4b?layers=9`` -> ("qwen3-4b", {"num_hidden_layers": 9}); ``context=N`` sets
    max_position_embeddings, ``yarn=F`` a YaRN rope_scaling of factor F whose original window is
    context / F (as Qwen documents YaRN for Qwen3)."""
    name, _, query = source[len(RANDOM_PREFIX):].partition("?")
    if name not in QWEN3_SHAPES:
        raise PipelineError(f"unknown shape {name!r} in model.source {source!r}; use one of "
                            f"{', '.join(RANDOM_PREFIX + k for k in QWEN3_SHAPES)} (optionally {RANDOM_QUERY})")
    overrides, yarn = {}, None
    for item in filter(None, query.split("&")):
        key, _, value = item.partition("=")
        if key in ("layers", "context") and value.isdigit() and int(value) >= 1:
            overrides["num_hidden_layers" if key == "layers" else "max_position_embeddings"] = int(value)
        elif key == "yarn" and value.replace(".", "", 1).isdigit() and float(value) > 1:
            yarn = float(value)
        elif key == "dtype" and value in ("bfloat16", "float16", "float32"):
            overrides["dtype"] = value
        else:
            raise PipelineError(f"model.source {source!r}: {item!r} is not one of {RANDOM_QUERY} (N >= 1, F > 1)")
    if yarn is not None:
        context = overrides.get("max_position_embeddings", QWEN3_SHAPES[name]["max_position_embeddings"])
        overrides["rope_scaling"] = {"rope_type": "yarn", "factor": yarn,
                                     "original_max_position_embeddings": int(context / yarn)}
    return name, overrides


def random_qwen3(source: str, cfg: CheckpointConfig, data_dir: Path, tmp: Path) -> dict:
    """A Qwen3 of a published shape with random weights from ``train.seed`` and the built-in tokenizer
    (the real vocab size kept, so the embedding and lm_head are the real size). Its perplexity means
    nothing; the stages after it measure what they measure on any model: drift, KLD, top-1, size, time."""
    import torch
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    from calibration.sources import read_split

    name, overrides = parse_random(source)
    tokenizer = train_tokenizer(read_split(data_dir, "train"), cfg.tokenizer.vocab_size, tmp)
    dtype = overrides.pop("dtype", "float32")
    shape = {"head_dim": 128, "vocab_size": QWEN3_VOCAB, **QWEN3_SHAPES[name], **overrides}
    shape["vocab_size"] = shape["vocab_size"] or len(tokenizer)
    check_memory("checkpoint", {**shape, "tie_word_embeddings": True})
    config = Qwen3Config(rms_norm_eps=1e-6, tie_word_embeddings=True,
                         bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.eos_token_id, use_cache=True, dtype=dtype, **shape)
    torch.manual_seed(cfg.train.seed)
    t0 = time.perf_counter()
    default = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))  # initialised in its stored dtype: no float32 copy first
    try:
        model = Qwen3ForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    model.eval()
    n_params = sum(p.numel() for p in model.parameters())
    width = 4 if dtype == "float32" else 2
    info(f"checkpoint: random {name} {config.num_hidden_layers} layers x {config.hidden_size}, "
         f"{n_params / 1e6:,.0f} M params, {n_params * width / 1e9:.2f} GB {dtype} ({time.perf_counter() - t0:.1f} s)")
    model.generation_config = GenerationConfig(eos_token_id=[tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(IM_END)],
                                               pad_token_id=tokenizer.eos_token_id, do_sample=False)
    model.save_pretrained(str(tmp), safe_serialization=True)
    del model
    return {"source": {"model": source, "kind": "random", "random_weights": True, "shape": name,
                       "data_id": _data_id(data_dir)},
            "metrics": {"params_m": round(n_params / 1e6, 3), "random_weights": True}}


# ---------------------------------------------------------------------------------------------- imported
PICKLE_WEIGHTS = ("pytorch_model*.bin", "*.pt", "*.pth", "*.ckpt")


def _check_causal_lm(directory: Path, label: str, allow_pickle: bool = False) -> dict:
    cfg_path = directory / "config.json"
    if not cfg_path.is_file():
        raise PipelineError(f"{label} has no config.json: not a Hugging Face checkpoint directory")
    config = json.loads(cfg_path.read_text())
    check_memory("checkpoint", config)
    archs = config.get("architectures") or []
    if not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        raise PipelineError(f"{label} is not a causal LM (architectures: {archs or 'none'}); "
                            f"the pipeline needs a *ForCausalLM checkpoint")
    if not (directory / "tokenizer.json").is_file():
        raise PipelineError(f"{label} has no tokenizer.json; the pipeline needs the model's fast tokenizer "
                            f"(save it with AutoTokenizer.from_pretrained(...).save_pretrained(dir))")
    if not list(directory.glob("*.safetensors")):
        pickles = sorted(p.name for pat in PICKLE_WEIGHTS for p in directory.glob(pat))
        if not pickles:
            raise PipelineError(f"{label} has no weights (no .safetensors file)")
        if not allow_pickle:
            raise PipelineError(
                f"{label} has only pickled weights ({', '.join(pickles)}): loading a pickle can run arbitrary code. "
                f"Convert them to safetensors where you trust the file, or set "
                f"model.allow_unsafe_pickle_weights=true to accept that risk (they are converted to safetensors once)")
    return config


def _convert_pickle(directory: Path, tmp: Path, trust_remote_code: bool) -> None:
    """Load pickled weights once (the user accepted the risk) and store them as safetensors."""
    import torch
    from transformers import AutoModelForCausalLM

    info(f"checkpoint: loading pickled weights from {directory} (model.allow_unsafe_pickle_weights) ...")
    model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32, use_safetensors=False,
                                                 trust_remote_code=trust_remote_code)
    model.save_pretrained(str(tmp), safe_serialization=True)


def import_checkpoint(model: Model, tmp: Path) -> dict:
    source, revision = model.source, model.revision
    allow_pickle, trust = model.allow_unsafe_pickle_weights, model.trust_remote_code
    path = Path(source).expanduser()
    if path.exists() or source.startswith(("/", ".", "~")):
        if not path.is_dir():
            raise PipelineError(f"model.source {source}: no such checkpoint directory")
        _check_causal_lm(path, source, allow_pickle)
        hashes = {p.name: mf.sha256_file(p) for pat in PICKLE_WEIGHTS for p in path.glob(pat)}
        for pattern in CHECKPOINT_PATTERNS:
            for f in path.glob(pattern):
                if f.is_file():
                    shutil.copy2(f, tmp / f.name)
        if not list(tmp.glob("*.safetensors")):
            _convert_pickle(path, tmp, trust)
        hashes.update({f.name: mf.sha256_file(f) for f in sorted(tmp.iterdir())})
        src = {"model": str(path.resolve()), "kind": "local", "file_sha256": hashes,
               **({"converted_from_pickle": True} if allow_pickle and not list(path.glob("*.safetensors")) else {})}
    else:
        try:
            from huggingface_hub import snapshot_download

            local = snapshot_download(source, revision=revision, allow_patterns=list(CHECKPOINT_PATTERNS))
        except Exception as exc:  # offline: LocalEntryNotFoundError, ConnectionError, ...
            raise PipelineError(
                f"could not fetch {source!r} from the Hugging Face hub ({type(exc).__name__}): offline or not a "
                f"model id. Download it on a networked machine and set model.source to the local directory") from None
        _check_causal_lm(Path(local), source)  # the hub path fetches safetensors only
        for f in Path(local).iterdir():
            if f.is_file():
                shutil.copy2(f, tmp / f.name)
        src = {"model": source, "kind": "hub", "revision": Path(local).name,
               "file_sha256": {f.name: mf.sha256_file(f) for f in sorted(tmp.iterdir())}}
    return {"source": src, "metrics": {}}


# Environment that pins every CPU code path training goes through, whatever the CPU offers: ATen's
# vectorized kernels, MKL's GEMMs (its conditional numerical reproducibility, CNR) and oneDNN's.
# "avx2": MKL's AVX2 branch, which MKL offers on Intel CPUs only (on AMD it silently takes its AUTO
# branch, so an AMD EPYC and an Intel Xeon trained different weights: docs/reliability.md).
# "portable": MKL's COMPATIBLE branch (SSE2), the one CNR branch MKL documents for Intel and AMD alike;
# it halves training speed here.
_AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "DNNL_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
CPU_PINS = {
    "avx2": {**_AVX2, "MKL_CBWR": "AVX2,STRICT"},
    "portable": {**_AVX2, "MKL_CBWR": "COMPATIBLE,STRICT"},
    "native": {},
}


def training(cfg: CheckpointConfig, data_dir: str, tmp: str) -> dict:
    return train_builtin(cfg, Path(data_dir), Path(tmp))


def train_pinned(cfg: CheckpointConfig, data_dir: Path, tmp: Path) -> dict:
    """Train in a fresh interpreter whose CPU code paths and thread count are fixed before torch loads:
    the libraries read these settings once, at start-up, so they cannot be changed in this process."""
    tp = cfg.train
    pins = dict(CPU_PINS[tp.cpu_code_path])
    pins.update({"OMP_NUM_THREADS": str(tp.threads), "MKL_NUM_THREADS": str(tp.threads)})
    made, peak = in_child(training, cfg, str(data_dir), str(tmp), env=pins)
    made["run"]["child_peak_rss_mb"] = peak  # the training interpreter's own peak
    made["source"]["cpu_code_path"] = tp.cpu_code_path
    return made


# ---------------------------------------------------------------------------------------------- stage
def build(inputs: Inputs, cfg: CheckpointConfig, tmp: Path) -> BuildResult:
    """The built-in model trained, a random-weight real shape, or an imported checkpoint; scored on the
    data artifact's held-out split. The id covers only the params that shape the model for its source."""
    source, data_dir = cfg.model.source, inputs.dir
    if source == BUILTIN:
        made = train_pinned(cfg, data_dir, tmp)
        covered = {"model": cfg.model, "tokenizer": cfg.tokenizer, "train": cfg.train}
    elif source.startswith(RANDOM_PREFIX):
        made = random_qwen3(source, cfg, data_dir, tmp)
        covered = {"model": cfg.model, "tokenizer": cfg.tokenizer, "seed": cfg.train.seed}
    elif source.startswith("builtin:"):
        raise PipelineError(f"unknown built-in model {source!r}; the built-in model is {BUILTIN}")
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
              flags={"--source": ("model.source", "alias for -S model.source=...: builtin:qwen3-tiny, "
                                                  "random:qwen3-0.6b, a local HF dir or a hub id")},
              summary="Hugging Face checkpoint (safetensors) the ONNX artifacts start from")
