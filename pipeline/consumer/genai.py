"""``genai_config.json``: what onnxruntime-genai needs to run an artifact as shipped.

Written into every ONNX artifact when it is published (so it is hashed into the artifact id, like
the graph it describes). The decoder's I/O names are read from the graph itself; the past/present
buffer is shared only where the graph runs GroupQueryAttention (which writes the new keys and values
into the buffer in place); a graph that concatenates its KV cache gets separate buffers."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline import families
from pipeline.errors import PipelineError

FILE = "genai_config.json"


def config_for(directory: Path) -> dict:
    import onnx

    from pipeline.consumer.runtime import DEFAULT_PREFILL_CHUNK, PAST_NAME, attention_shape, special_token_id, uses_gqa

    graph = onnx.load(str(directory / "model.onnx"), load_external_data=False).graph
    config = json.loads((directory / "config.json").read_text())
    generation = directory / "generation_config.json"
    gen = json.loads(generation.read_text()) if generation.is_file() else {}
    inputs = {i.name for i in graph.input}
    outputs = {o.name for o in graph.output}
    if not {"input_ids", "logits"} <= inputs | outputs:
        raise PipelineError(f"{directory}/model.onnx is not a causal-LM decoder (input_ids -> logits)")
    layers = int(config["num_hidden_layers"])
    if sum(1 for n in inputs if PAST_NAME.match(n)) != 2 * layers:
        raise PipelineError(f"{directory}/model.onnx does not have past_key_values.N.key/value for {layers} layers")
    heads, kv_heads, head_dim = attention_shape(config)
    eos = gen.get("eos_token_id", config.get("eos_token_id"))
    if eos is None:
        eos = special_token_id(directory, "eos_token")
    if eos is None:
        raise PipelineError(f"{directory} names no end-of-sequence token (eos_token_id in config.json or "
                            f"generation_config.json, eos_token in tokenizer_config.json): onnxruntime-genai needs one")
    pad = gen.get("pad_token_id", config.get("pad_token_id"))
    if pad is None:
        pad = eos[0] if isinstance(eos, list) else eos
    bos = config.get("bos_token_id")
    if bos is None:
        bos = special_token_id(directory, "bos_token")
    decoder_inputs = {"input_ids": "input_ids"}
    for name in ("attention_mask", "position_ids"):
        if name in inputs:
            decoder_inputs[name] = name
    decoder_inputs |= {"past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"}
    context = int(config["max_position_embeddings"])
    return {
        "model": {
            "bos_token_id": bos if bos is not None else pad,
            "context_length": context,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": "model.onnx",
                "head_size": head_dim,
                "hidden_size": int(config["hidden_size"]),
                "inputs": decoder_inputs,
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
                "num_attention_heads": heads,
                "num_hidden_layers": layers,
                "num_key_value_heads": kv_heads,
            },
            "eos_token_id": eos,
            "pad_token_id": pad,
            "type": families.of(config).genai,
            "vocab_size": int(config["vocab_size"]),
        },
        "search": {
            "diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
            # onnxruntime-genai 0.18 prefills in chunks of this many tokens, so a long prompt's activations
            # stay the size of one chunk (docs/long-context.md)
            "chunk_size": DEFAULT_PREFILL_CHUNK,
            "max_length": context, "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
            "num_return_sequences": 1, "past_present_share_buffer": uses_gqa(onnx.ModelProto(graph=graph)),
            "repetition_penalty": 1.0, "temperature": 1.0, "top_k": 1, "top_p": 1.0,
        },
    }


def write(directory: str | Path) -> None:
    directory = Path(directory)
    (directory / FILE).write_text(json.dumps(config_for(directory), indent=2) + "\n")
