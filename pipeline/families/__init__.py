"""The architecture seam: one small declaration per model family, as onnxruntime-genai's builder has one
class per architecture. A family's file (``pipeline/families/<name>.py``) says what the stages need to
know of it, and nothing else does:

- the transformers classes that build its ``random:<shape>`` checkpoints, and its published shapes;
- its model type in onnxruntime-genai's ``genai_config.json``;
- the form of its q/k/v projections (QK-norm'd, plain, biased), which picks the packed-QKV rewrite the
  fused stage applies (pipeline/graph/fusions.py), so a rewrite that does not fire is said, not silent;
- how it reads its sliding attention window, and which windows the fused attention cannot carry;
- which projections read which norm (the function-preserving outlier copy, pipeline/outliers.py).

A family is found by its ``model_type`` (config.json). Families are discovered from this folder (each
module's ``FAMILY``): a new family is one file plus its tests. pipeline/dvcgen.py counts every module of
a package that sets ``DISCOVERS_MODULES`` as a dependency of whatever imports it.

Nothing here imports numpy, torch or transformers: the consumer (genai_config) reads it too."""

from __future__ import annotations

import functools
import importlib
import pkgutil
from typing import ClassVar, Literal

from pipeline.errors import PipelineError

DISCOVERS_MODULES = True  # pipeline/dvcgen.py: every module here is a dependency of an importer of this package

ATTENTION_INPUTS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
MLP_INPUTS = ("mlp.gate_proj", "mlp.up_proj")


class Family:
    """The defaults are the Llama layout every supported family shares; a family overrides what differs."""

    model_type: ClassVar[str]                  # config.json's model_type
    classes: ClassVar[tuple[str, str]]         # transformers' config and causal-LM classes
    # q/k/v: QK-norm'd, plain, with biases, or already one projection (Phi-3's qkv_proj)
    projections: ClassVar[Literal["qk_norm", "plain", "bias", "packed"]]
    genai_type: ClassVar[str | None] = None    # onnxruntime-genai's model type (None: model_type)
    # ORT's transformer optimizer model_type whose RMSNorm fusions match the family's export: ORT has no
    # llama / qwen2 / mistral type; its qwen3 one fuses any RMSNorm decoder's (SimplifiedLayerNormalization)
    ort_optimizer: ClassVar[str] = "qwen3"
    shapes: ClassVar[dict[str, dict]] = {}     # random:<name> -> every config field unlike transformers' default
    # norm -> the projections reading its output (the outlier copy scales across each pair)
    norm_inputs: ClassVar[dict[str, tuple[str, ...]]] = {"input_layernorm": ATTENTION_INPUTS,
                                                         "post_attention_layernorm": MLP_INPUTS}
    # the MLP's inner pair: up_proj's rows feed down_proj's columns (intermediate channels)
    inner: ClassVar[tuple[str, str]] = ("mlp.up_proj", "mlp.down_proj")

    def inner_rows(self, config: dict) -> int:
        """Where up's rows start in ``inner[0]`` (0; Phi-3's gate_up_proj holds gate's rows first)."""
        return 0

    @property
    def genai(self) -> str:
        return self.genai_type or self.model_type

    def window(self, config: dict) -> int | None:
        """The attention window every layer applies, as transformers reads it: ``sliding_window`` where
        ``use_sliding_window`` (Qwen's switch) does not turn it off. None where there is none or it covers
        the whole context (then it changes nothing)."""
        window = config.get("sliding_window")
        if not isinstance(window, int) or isinstance(window, bool) or window <= 0:
            return None
        if "use_sliding_window" in config and not config["use_sliding_window"]:
            return None
        if window >= int(config.get("max_position_embeddings") or 0):
            return None
        return window

    def unfusable(self, config: dict) -> str | None:
        """Why the fused attention (one GroupQueryAttention per layer, one window for all) would not compute
        this checkpoint's attention; None when it does."""
        if config.get("use_sliding_window"):  # Qwen's: a window from max_window_layers on, none below
            return "its layers' attention windows differ (use_sliding_window, max_window_layers)"
        if len(set(config.get("layer_types") or ())) > 1:
            return "its layers' attention windows differ (layer_types)"
        return None


@functools.lru_cache(maxsize=1)
def all_families() -> dict[str, Family]:
    """model_type -> its declaration, from every module in this folder."""
    found = {}
    for module in pkgutil.iter_modules(__path__):
        family = importlib.import_module(f"{__name__}.{module.name}").FAMILY
        found[family.model_type] = family
    return dict(sorted(found.items()))


def names() -> str:
    return ", ".join(all_families())


def of(config: dict, label: str = "the checkpoint") -> Family:
    """The family of a checkpoint's config.json, or one line naming what is supported."""
    kind = config.get("model_type")
    family = all_families().get(kind) if isinstance(kind, str) else None
    if family is None:
        raise PipelineError(f"{label} has model_type {str(kind)[:40]!r}: unsupported (the supported families: "
                            f"{names()}; pipeline/families/ declares each)")
    return family


def shape(name: str) -> tuple[Family, dict]:
    """The family and the whole config of a published shape (``random:<name>``)."""
    for family in all_families().values():
        if name in family.shapes:
            return family, dict(family.shapes[name])
    raise KeyError(name)


def shape_names() -> list[str]:
    return [name for family in all_families().values() for name in family.shapes]
