"""Qwen3 (the target: Qwen3-4B-Instruct-2507): QK-norm (an RMSNorm per head on q and k), no biases, tied
embedding at the small sizes, head_dim 128 whatever the width."""

from pipeline.families import Family

_COMMON = {"head_dim": 128, "vocab_size": 151936, "tie_word_embeddings": True, "rms_norm_eps": 1e-6}


class Qwen3(Family):
    model_type = "qwen3"
    classes = ("Qwen3Config", "Qwen3ForCausalLM")
    projections = "qk_norm"
    # config.json of Qwen/Qwen3-0.6B, -1.7B and Qwen3-4B-Instruct-2507
    shapes = {
        "qwen3-0.6b": {**_COMMON, "hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 28,
                       "num_attention_heads": 16, "num_key_value_heads": 8, "max_position_embeddings": 40960,
                       "rope_theta": 1_000_000.0},
        "qwen3-1.7b": {**_COMMON, "hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 28,
                       "num_attention_heads": 16, "num_key_value_heads": 8, "max_position_embeddings": 40960,
                       "rope_theta": 1_000_000.0},
        "qwen3-4b": {**_COMMON, "hidden_size": 2560, "intermediate_size": 9728, "num_hidden_layers": 36,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 262144,
                     "rope_theta": 5_000_000.0},
        # not published: 2 layers small enough to test long contexts (8k+) in the suite, with the built-in
        # tokenizer's vocab (None: the tokenizer's size)
        "qwen3-micro": {**_COMMON, "hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 2,
                        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
                        "max_position_embeddings": 32768, "rope_theta": 1_000_000.0, "vocab_size": None},
    }


FAMILY = Qwen3()
