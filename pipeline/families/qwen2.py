"""Qwen2 / Qwen2.5: biases on q, k and v, no QK-norm; tied embedding up to 3B."""

from pipeline.families import Family

_COMMON = {"max_position_embeddings": 32768, "rope_theta": 1_000_000.0, "rms_norm_eps": 1e-6}


class Qwen2(Family):
    model_type = "qwen2"
    classes = ("Qwen2Config", "Qwen2ForCausalLM")
    projections = "bias"
    # config.json of Qwen/Qwen2.5-0.5B, -1.5B, -7B (-Instruct alike)
    shapes = {
        "qwen2.5-0.5b": {**_COMMON, "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
                         "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936,
                         "tie_word_embeddings": True},
        "qwen2.5-1.5b": {**_COMMON, "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
                         "num_attention_heads": 12, "num_key_value_heads": 2, "vocab_size": 151936,
                         "tie_word_embeddings": True},
        "qwen2.5-7b": {**_COMMON, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                       "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
                       "tie_word_embeddings": False},
    }


FAMILY = Qwen2()
