"""Random weights in published shapes (``random:qwen3-0.6b``, ``random:llama-3.2-1b`` ...): the real
sizes, to measure memory, time and the pipeline's behaviour at scale without a hub. ``cfg`` is the
checkpoint stage's config (stages/checkpoint.py)."""

from __future__ import annotations

import time
from pathlib import Path

from pipeline import families
from pipeline.checkpoints.builtin import IM_END, data_id, train_tokenizer
from pipeline.errors import PipelineError
from pipeline.log import info
from pipeline.ops.memory import check as check_memory

# The Qwen3 sizes, named by the benchmarks and tests that measure the target
QWEN3_SHAPES = families.all_families()["qwen3"].shapes
QWEN3_VOCAB = QWEN3_SHAPES["qwen3-4b"]["vocab_size"]
RANDOM_PREFIX = "random:"
RANDOM_QUERY = ("?layers=N, &context=N (max_position_embeddings), &yarn=F (rope_scaling YaRN by F over context / F), "
                "&dtype=bfloat16|float16 (stored as the hub stores it)")


def parse_random(source: str) -> tuple[str, dict]:
    """``random:qwen3-4b?layers=9`` -> ("qwen3-4b", {"num_hidden_layers": 9}); ``context=N`` sets
    max_position_embeddings, ``yarn=F`` a YaRN rope_scaling of factor F whose original window is
    context / F (as Qwen documents YaRN for Qwen3)."""
    name, _, query = source[len(RANDOM_PREFIX):].partition("?")
    if name not in families.shape_names():
        raise PipelineError(f"unknown shape {name!r} in model.source {source!r}; use one of "
                            f"{', '.join(RANDOM_PREFIX + k for k in families.shape_names())} "
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
        context = overrides.get("max_position_embeddings", families.shape(name)[1]["max_position_embeddings"])
        overrides["rope_scaling"] = {"rope_type": "yarn", "factor": yarn,
                                     "original_max_position_embeddings": int(context / yarn)}
    return name, overrides


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
    family, shape = families.shape(name)
    shape.update(overrides)
    shape["vocab_size"] = shape["vocab_size"] or len(tokenizer)
    check_memory("checkpoint", shape)
    config_class, model_class = (getattr(transformers, c) for c in family.classes)
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
