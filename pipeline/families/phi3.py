"""Phi-3 (mini, 4k context): q, k and v in one ``qkv_proj`` and gate and up in one ``gate_up_proj`` (already
packed, as the fused graph wants them), a rotary embedding the export slices off and concatenates back
(``partial_rotary_factor``), untied lm_head. Phi-3.5 and Phi-4 mini scale their RoPE with ``longrope``,
whose tables switch at the original context: the fused stage refuses it in one line."""

from pipeline.families import Family


class Phi3(Family):
    model_type = "phi3"
    classes = ("Phi3Config", "Phi3ForCausalLM")
    projections = "packed"
    norm_inputs = {"input_layernorm": ("self_attn.qkv_proj",), "post_attention_layernorm": ("mlp.gate_up_proj",)}
    inner = ("mlp.gate_up_proj", "mlp.down_proj")
    # config.json of microsoft/Phi-3-mini-4k-instruct
    shapes = {
        "phi-3-mini-4k": {"hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 32,
                          "num_attention_heads": 32, "num_key_value_heads": 32, "max_position_embeddings": 4096,
                          "original_max_position_embeddings": 4096, "rope_theta": 10000.0, "vocab_size": 32064,
                          "tie_word_embeddings": False, "sliding_window": 2047, "rms_norm_eps": 1e-5},
    }

    def inner_rows(self, config: dict) -> int:
        return int(config["intermediate_size"])  # gate_up_proj's rows: gate, then up


FAMILY = Phi3()
