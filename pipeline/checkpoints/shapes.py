"""Random weights in published shapes (``random:qwen3-0.6b``, ``random:llama-3.2-1b`` ...): the real
sizes, to measure memory, time and the pipeline's behaviour at scale without a hub. ``cfg`` is the
checkpoint stage's config (stages/checkpoint.py)."""

from __future__ import annotations

import time
from pathlib import Path

from pipeline.checkpoints.builtin import IM_END, data_id, train_tokenizer
from pipeline.errors import PipelineError
from pipeline.log import info
from pipeline.ops.memory import check as check_memory

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
# The other families' published shapes (config.json of each hub checkpoint): the family, and every field
# of it that differs from transformers' defaults for its class.
_LLAMA3_ROPE = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}
FAMILY_SHAPES = {
    "qwen2.5-0.5b": ("qwen2", {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
                               "num_attention_heads": 14, "num_key_value_heads": 2, "max_position_embeddings": 32768,
                               "rope_theta": 1_000_000.0, "vocab_size": 151936, "tie_word_embeddings": True,
                               "rms_norm_eps": 1e-6}),
    "qwen2.5-1.5b": ("qwen2", {"hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
                               "num_attention_heads": 12, "num_key_value_heads": 2, "max_position_embeddings": 32768,
                               "rope_theta": 1_000_000.0, "vocab_size": 151936, "tie_word_embeddings": True,
                               "rms_norm_eps": 1e-6}),
    "qwen2.5-7b": ("qwen2", {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                             "num_attention_heads": 28, "num_key_value_heads": 4, "max_position_embeddings": 32768,
                             "rope_theta": 1_000_000.0, "vocab_size": 152064, "tie_word_embeddings": False,
                             "rms_norm_eps": 1e-6}),
    "llama-3.2-1b": ("llama", {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                               "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
                               "max_position_embeddings": 131072, "rope_theta": 500_000.0, "vocab_size": 128256,
                               "tie_word_embeddings": True, "rms_norm_eps": 1e-5,
                               "rope_scaling": {**_LLAMA3_ROPE, "factor": 32.0}}),
    "llama-3.1-8b": ("llama", {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                               "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 131072,
                               "rope_theta": 500_000.0, "vocab_size": 128256, "tie_word_embeddings": False,
                               "rms_norm_eps": 1e-5, "rope_scaling": {**_LLAMA3_ROPE, "factor": 8.0}}),
    "mistral-7b": ("mistral", {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                               "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 32768,
                               "rope_theta": 1_000_000.0, "vocab_size": 32768, "tie_word_embeddings": False,
                               "sliding_window": None, "rms_norm_eps": 1e-5}),
}
# family -> transformers' config and model classes
CLASSES = {"qwen3": ("Qwen3Config", "Qwen3ForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
           "llama": ("LlamaConfig", "LlamaForCausalLM"), "mistral": ("MistralConfig", "MistralForCausalLM")}
RANDOM_PREFIX = "random:"
RANDOM_QUERY = ("?layers=N, &context=N (max_position_embeddings), &yarn=F (rope_scaling YaRN by F over context / F), "
                "&dtype=bfloat16|float16 (stored as the hub stores it)")


def parse_random(source: str) -> tuple[str, dict]:
    """``random:qwen3-4b?layers=9`` -> ("qwen3-4b", {"num_hidden_layers": 9}); ``context=N`` sets
    max_position_embeddings, ``yarn=F`` a YaRN rope_scaling of factor F whose original window is
    context / F (as Qwen documents YaRN for Qwen3)."""
    name, _, query = source[len(RANDOM_PREFIX):].partition("?")
    if name not in QWEN3_SHAPES and name not in FAMILY_SHAPES:
        raise PipelineError(f"unknown shape {name!r} in model.source {source!r}; use one of "
                            f"{', '.join(RANDOM_PREFIX + k for k in (*QWEN3_SHAPES, *FAMILY_SHAPES))} "
                            f"(optionally {RANDOM_QUERY})")
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
        context = overrides.get("max_position_embeddings", shape_of(name)[1]["max_position_embeddings"])
        overrides["rope_scaling"] = {"rope_type": "yarn", "factor": yarn,
                                     "original_max_position_embeddings": int(context / yarn)}
    return name, overrides


def shape_of(name: str) -> tuple[str, dict]:
    """(family, the whole config) of a known shape."""
    if name in FAMILY_SHAPES:
        family, shape = FAMILY_SHAPES[name]
        return family, dict(shape)
    return "qwen3", {"head_dim": 128, "vocab_size": QWEN3_VOCAB, "tie_word_embeddings": True, "rms_norm_eps": 1e-6,
                     **QWEN3_SHAPES[name]}


def random_checkpoint(source: str, cfg, data_dir: Path, tmp: Path) -> dict:
    """A model of a published shape with random weights from ``train.seed`` and the built-in tokenizer
    (the real vocab size kept, so the embedding and lm_head are the real size). Its perplexity means
    nothing; the stages after it measure what they measure on any model: drift, KLD, top-1, size, time."""
    import torch
    import transformers
    from transformers import GenerationConfig

    from pipeline.text.sources import read_split

    name, overrides = parse_random(source)
    tokenizer = train_tokenizer(read_split(data_dir, "train"), cfg.tokenizer.vocab_size, tmp)
    dtype = overrides.pop("dtype", "float32")
    family, shape = shape_of(name)
    shape.update(overrides)
    shape["vocab_size"] = shape["vocab_size"] or len(tokenizer)
    check_memory("checkpoint", shape)
    config_class, model_class = (getattr(transformers, c) for c in CLASSES[family])
    config = config_class(bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.eos_token_id, use_cache=True, dtype=dtype, **shape)
    torch.manual_seed(cfg.train.seed)
    t0 = time.perf_counter()
    default = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))  # initialised in its stored dtype: no float32 copy first
    try:
        model = model_class(config)
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
                       "data_id": data_id(data_dir)},
            "metrics": {"params_m": round(n_params / 1e6, 3), "random_weights": True}}
