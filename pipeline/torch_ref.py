"""PyTorch reference for a checkpoint directory: logits and greedy decoding, the export's yardstick.

Imported only where torch is needed (export parity, evaluating the export against PyTorch)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


class TorchModel:
    def __init__(self, checkpoint_dir: str | Path):
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(os.cpu_count() or 1)
        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(str(checkpoint_dir), dtype=torch.float32,
                                                          use_safetensors=True)
        self.model.eval()
        self.eos_token_id = self.model.config.eos_token_id

    def logits(self, ids: np.ndarray) -> np.ndarray:
        with self.torch.inference_mode():
            out = self.model(input_ids=self.torch.as_tensor(np.asarray(ids, dtype=np.int64)[None]))
        return out.logits[0].float().numpy()

    def greedy(self, ids: list[int], max_new_tokens: int) -> list[int]:
        """Greedy continuation with the KV cache, ignoring EOS (parity checks compare fixed lengths)."""
        torch = self.torch
        with torch.inference_mode():
            out = self.model(input_ids=torch.as_tensor([ids]), use_cache=True)
            tokens = []
            for _ in range(max_new_tokens):
                nxt = int(out.logits[0, -1].argmax())
                tokens.append(nxt)
                out = self.model(input_ids=torch.as_tensor([[nxt]]), past_key_values=out.past_key_values,
                                 use_cache=True)
        return tokens
