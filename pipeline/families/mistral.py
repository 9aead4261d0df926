"""Mistral: plain q/k/v, untied; ``sliding_window`` (one window for every layer) is carried into
GroupQueryAttention's ``local_window_size`` (v0.1 has 4096; v0.3 and later none)."""

from pipeline.families import Family


class Mistral(Family):
    model_type = "mistral"
    classes = ("MistralConfig", "MistralForCausalLM")
    projections = "plain"
    # config.json of mistralai/Mistral-7B-v0.3
    shapes = {
        "mistral-7b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                       "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 32768,
                       "rope_theta": 1_000_000.0, "vocab_size": 32768, "tie_word_embeddings": False,
                       "sliding_window": None, "rms_norm_eps": 1e-5},
    }


FAMILY = Mistral()
