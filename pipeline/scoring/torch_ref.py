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


HALF = ("bfloat16", "float16")


def stored_dtype(checkpoint_dir: str | Path) -> str:
    """The dtype a checkpoint's config.json says its weights are stored in (float32 when it says none)."""
    import json

    config = json.loads((Path(checkpoint_dir) / "config.json").read_text())
    return str(config.get("dtype") or config.get("torch_dtype") or "float32")


def compute_in_float32(model) -> None:
    """Run a half-precision (bf16 / fp16) model in float32 one module at a time: before each module's
    forward its own parameters are upcast (exactly: every bf16 / fp16 value is a float32 value), after
    it they are put back. The logits are those of the same weights loaded as float32, while the model
    stays in its stored bytes: the whole float32 copy never exists.

    The upcasts go into float32 buffers kept one per parameter shape (a handful, the tied table's the
    largest, a transient anyway). A fresh float32 copy per module and per call is a fresh mapping the
    kernel must fault in and zero: the model's size in page faults for every decoded token, which kept
    the export's reference decode mostly in the kernel."""
    import torch

    buffers: dict[tuple, torch.Tensor] = {}
    busy: set[tuple] = set()  # a module inside another that uses the same shape gets a copy of its own

    def up(module, args):
        module._stored_half = []
        for i, p in enumerate(module.parameters(recurse=False)):
            key = (tuple(p.shape), i)
            if key in busy:
                key, buf = None, p.data.float()
            else:
                buf = buffers.get(key)
                if buf is None:
                    buf = buffers[key] = torch.empty(p.shape, dtype=torch.float32)
                buf.copy_(p.data)
                busy.add(key)
            module._stored_half.append((p, p.data, key))
            p.data = buf

    def down(module, args, output):
        for p, data, key in module._stored_half:
            p.data = data
            busy.discard(key)
        del module._stored_half

    for module in model.modules():
        if any(True for _ in module.parameters(recurse=False)):
            module.register_forward_pre_hook(up)
            module.register_forward_hook(down)


class TorchModel:
    def __init__(self, checkpoint_dir: str | Path, trust_remote_code: bool | None = None):
        """``trust_remote_code`` None: as the checkpoint's manifest recorded it (model.trust_remote_code), else off.

        Semantics: the checkpoint's weights, computed in float32 (what the FP32 export computes). A bf16
        or fp16 checkpoint stays in its own dtype and is upcast module by module
        (:func:`compute_in_float32`): its logits, greedy tokens and decode path are those of the same
        weights loaded as float32 (the same values; only BLAS's blocking may differ, 1e-7 seen), in half
        the memory."""
        import torch
        from transformers import AutoModelForCausalLM

        if trust_remote_code is None:
            trust_remote_code = trusted(checkpoint_dir)
        torch.set_num_threads(os.cpu_count() or 1)
        self.torch = torch
        self.stored = stored_dtype(checkpoint_dir)
        half = self.stored in HALF
        self.model = AutoModelForCausalLM.from_pretrained(str(checkpoint_dir),
                                                          dtype=getattr(torch, self.stored) if half else torch.float32,
                                                          use_safetensors=True, trust_remote_code=trust_remote_code)
        if half:
            compute_in_float32(self.model)
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
        """The reference for the runtime's decode path (``prefix`` tokens prefilled, then one token a
        step through the KV cache): the same positions' logits from one causal pass over ``ids``. Run a
        token a step here too, each step would read the whole model (minutes of the export stage at 4B)
        for logits a causal pass gives at once (the candidate's own KV cache path is what the comparison
        checks)."""
        ids = np.asarray(ids, dtype=np.int64)
        return self.logits(ids, last=len(ids) - prefix + 1)


SKELETON_MARK = 2.0 ** -8
"""The value every parameter of :func:`skeleton` holds: exact in float32 and small enough that the traced
forward stays finite. One value for all: the parameters are traced as graph inputs named by the state
dict (``compat.torch_exports_no_params``), so nothing merges parameters of equal value (test: the graph
is optimum's export of the real weights, byte for byte)."""


def skeleton(checkpoint_dir: str | Path, trust_remote_code: bool):
    """The checkpoint's model, as transformers builds it for ``from_pretrained`` in float32, without its
    weights: every parameter is one float32 scalar broadcast to its shape (a zero-stride view, 4 bytes),
    holding :data:`SKELETON_MARK`; buffers (the rotary inverse frequencies) are computed as usual.
    A traced graph does not depend on the weights' values, so tracing this gives the graph of the real
    model (test: the same nodes and, once the weights are put in, the same bytes). Parameters shared by
    several modules (a tied lm_head) stay shared. Returns the model and its parameters' state-dict names."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig
    from transformers.integrations.accelerate import init_empty_weights

    config = AutoConfig.from_pretrained(str(checkpoint_dir), trust_remote_code=trust_remote_code)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=trust_remote_code)
    model.tie_weights()  # from_config leaves meta parameters untied; from_pretrained ties them
    if (Path(checkpoint_dir) / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(checkpoint_dir))
    replaced: dict[int, torch.nn.Parameter] = {}
    names: list[str] = []
    for name, param in model.named_parameters(remove_duplicate=True):
        replaced[id(param)] = torch.nn.Parameter(
            torch.full((), SKELETON_MARK, dtype=torch.float32).expand(param.shape), requires_grad=False)
        names.append(name)
    for module in model.modules():
        for pname, param in list(module._parameters.items()):
            if param is not None:
                module._parameters[pname] = replaced[id(param)]
    model.config.dtype = torch.float32  # what from_pretrained(dtype=float32) records; optimum writes it out
    model.eval()
    return model, names


def checkpoint_tensors(checkpoint_dir: str | Path) -> dict[str, tuple[Path, tuple[int, ...]]]:
    """{tensor name: (the safetensors file that holds it, its shape)}, over every shard of the checkpoint."""
    from safetensors import safe_open

    where: dict[str, tuple[Path, tuple[int, ...]]] = {}
    for path in sorted(Path(checkpoint_dir).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                where[key] = (path, tuple(f.get_slice(key).get_shape()))
    return where


def read_float32(path: Path, name: str) -> np.ndarray:
    """One checkpoint tensor as float32 (a bf16 / fp16 value is exactly a float32 value)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor(name).float().numpy()
