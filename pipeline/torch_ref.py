"""PyTorch reference for a checkpoint directory: logits and greedy decoding, the export's yardstick.

Imported only where torch is needed (export parity, evaluating the export against PyTorch)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def trusted(checkpoint_dir: str | Path) -> bool:
    """Whether the user asked to run the checkpoint's own code (model.trust_remote_code when it was imported)."""
    import json

    path = Path(checkpoint_dir) / "manifest.json"
    if not path.is_file():
        return False
    return bool(json.loads(path.read_text()).get("params", {}).get("model", {}).get("trust_remote_code", False))


class TorchModel:
    def __init__(self, checkpoint_dir: str | Path, trust_remote_code: bool | None = None):
        """``trust_remote_code`` None: as the checkpoint's manifest recorded it (model.trust_remote_code), else off."""
        import torch
        from transformers import AutoModelForCausalLM

        if trust_remote_code is None:
            trust_remote_code = trusted(checkpoint_dir)
        torch.set_num_threads(os.cpu_count() or 1)
        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(str(checkpoint_dir), dtype=torch.float32,
                                                          use_safetensors=True, trust_remote_code=trust_remote_code)
        self.model.eval()
        self.eos_token_id = self.model.config.eos_token_id

    def logits(self, ids: np.ndarray, last: int = 0) -> np.ndarray:
        """Every position's logits, or the last ``last`` positions' only (transformers' ``logits_to_keep``)."""
        with self.torch.inference_mode():
            out = self.model(input_ids=self.torch.as_tensor(np.asarray(ids, dtype=np.int64)[None]), logits_to_keep=last)
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

    def decode_path_logits(self, ids, prefix: int = 1) -> np.ndarray:
        """As the runtime's: ``prefix`` tokens prefilled, then one token a step through the KV cache."""
        torch = self.torch
        ids = [int(t) for t in ids]
        with torch.inference_mode():
            out = self.model(input_ids=torch.as_tensor([ids[:prefix]]), use_cache=True)
            rows = [out.logits[0, -1].float().numpy().copy()]
            for t in ids[prefix:]:
                out = self.model(input_ids=torch.as_tensor([[t]]), past_key_values=out.past_key_values, use_cache=True)
                rows.append(out.logits[0, -1].float().numpy().copy())
        return np.stack(rows)
