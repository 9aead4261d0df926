"""Llama 3.x: plain q/k/v, Llama 3's RoPE (``rope_type: llama3``, pipeline/graph/fusions.py); 3.2 ties its
embedding, 3.1 does not."""

from pipeline.families import Family

_ROPE = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": 8192}
_COMMON = {"max_position_embeddings": 131072, "rope_theta": 500_000.0, "vocab_size": 128256, "rms_norm_eps": 1e-5}


class Llama(Family):
    model_type = "llama"
    classes = ("LlamaConfig", "LlamaForCausalLM")
    projections = "plain"
    # config.json of meta-llama/Llama-3.2-1B and Llama-3.1-8B
    shapes = {
        "llama-3.2-1b": {**_COMMON, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                         "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
                         "tie_word_embeddings": True, "rope_scaling": {**_ROPE, "factor": 32.0}},
        "llama-3.1-8b": {**_COMMON, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                         "num_attention_heads": 32, "num_key_value_heads": 8, "tie_word_embeddings": False,
                         "rope_scaling": {**_ROPE, "factor": 8.0}},
    }


FAMILY = Llama()
