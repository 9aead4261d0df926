"""The built-in model, readable top to bottom (nanoGPT-style): a byte-level BPE tokenizer trained on
the data stage's train split, a small Qwen3 (transformers' own class) trained on it with AdamW and a
cosine schedule, in a fresh interpreter whose CPU code paths are pinned so the same data gives the
same weights (docs/reliability.md). ``cfg`` is the checkpoint stage's config (stages/checkpoint.py).

The same recipe trains any declared family's architecture (``builtin:llama-tiny``, ``builtin:phi3-tiny``
...: pipeline/families/), so each family is measured on a trained model, not only on random weights."""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np

from pipeline.consumer import manifest as mf
from pipeline.errors import PipelineError
from pipeline.log import info
from pipeline.ops.child import in_child

BUILTIN = "builtin:qwen3-tiny"
TINY_SUFFIX = "-tiny"


def builtin_family(source: str) -> str | None:
    """``builtin:<family>-tiny`` -> the family's model_type; None for another source."""
    from pipeline import families

    if not source.startswith("builtin:"):
        return None
    kind = source[len("builtin:"):].removesuffix(TINY_SUFFIX)
    if not source.endswith(TINY_SUFFIX) or kind not in families.all_families():
        raise PipelineError(f"unknown built-in model {source!r}; use builtin:<family>-tiny, a family of "
                            f"{families.names()} (default {BUILTIN})")
    return kind
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


def train_builtin(cfg, data_dir: Path, tmp: Path) -> dict:
    import torch
    import transformers
    from transformers import GenerationConfig

    from pipeline import families
    from pipeline.text.sources import read_split

    family = families.all_families()[builtin_family(cfg.model.source)]
    config_class, model_class = (getattr(transformers, c) for c in family.classes)

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

    config = config_class(
        vocab_size=len(tokenizer), hidden_size=tp.hidden_size, intermediate_size=tp.intermediate_size,
        num_hidden_layers=tp.layers, num_attention_heads=tp.heads, num_key_value_heads=tp.kv_heads,
        head_dim=tp.head_dim, max_position_embeddings=tp.max_position_embeddings, rope_theta=10000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=True, bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id, attention_dropout=0.0, use_cache=True,
        torch_dtype="float32",
    )
    model = model_class(config)
    n_params = sum(p.numel() for p in model.parameters())
    info(f"checkpoint: {family.model_type} {config.num_hidden_layers} layers x {config.hidden_size}, "
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
        "source": {"model": cfg.model.source, "data_id": data_id(data_dir)},
        "metrics": {"params_m": round(n_params / 1e6, 3), "train_tokens": steps * bs * seq,
                    "final_loss": round(loss_ema, 4)},
        "run": {"train_seconds": round(train_s, 1)},
    }


def data_id(data_dir: Path) -> str | None:
    try:
        return mf.read_manifest(data_dir)["artifact_id"]
    except PipelineError:
        return None


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


def training(cfg, data_dir: str, tmp: str) -> dict:
    return train_builtin(cfg, Path(data_dir), Path(tmp))


def train_pinned(cfg, data_dir: Path, tmp: Path) -> dict:
    """Train in a fresh interpreter whose CPU code paths and thread count are fixed before torch loads:
    the libraries read these settings once, at start-up, so they cannot be changed in this process."""
    tp = cfg.train
    pins = dict(CPU_PINS[tp.cpu_code_path])
    pins.update({"OMP_NUM_THREADS": str(tp.threads), "MKL_NUM_THREADS": str(tp.threads)})
    made, peak = in_child(training, cfg, str(data_dir), str(tmp), env=pins)
    made["run"]["child_peak_rss_mb"] = peak  # the training interpreter's own peak
    made["source"]["cpu_code_path"] = tp.cpu_code_path
    return made
