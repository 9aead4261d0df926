"""Graph fusions, in one place, written as onnxscript rewrite patterns.

ORT's transformer optimizer (model_type qwen3) fuses the RMSNorms of optimum's export but not its
rotary embedding or attention, and onnxscript's ready-made ``ort_fusions`` target dynamo exports
(measured: nothing fused on this export). So the attention of each decoder layer, as optimum writes
it for Qwen3 (after ORT has turned q_norm/k_norm into ``SimplifiedLayerNormalization``)::

    q_norm(B,S,H,D) -> Transpose -> rotate-half RoPE -> Mul(scale_q) ----------------------\\
    k_norm(B,S,Hkv,D) -> Transpose -> RoPE -> Concat(past_k) = present_k -> repeat_kv -> Transpose -> Mul(scale_k)
                                                                         MatMul -> Add(mask) -> Softmax -> NaN guard
    v(B,S,Hkv*D) -> Reshape -> Transpose -> Concat(past_v) = present_v -> repeat_kv ------> MatMul -> Transpose -> Reshape

is matched by one pattern and replaced with one ``com.microsoft.GroupQueryAttention`` (rotary inside
the op, cos/sin caches cut to the context, KV cache in the op's BNSH layout, past and present able to
share one buffer), the op onnxruntime-genai's builder emits. The pattern leaves the shape arithmetic
(Shape/Gather/Concat feeding Reshape, Expand and Slice) as free variables: the derived artifact's
parity check (greedy tokens and logits against its parent) is what proves each rewrite right.

GQA reads the sequence lengths instead of a 4-D mask: ``seqlens_k = sum(attention_mask) - 1`` and
``total_sequence_length = attention_mask.shape[1]``, so padding must be on the right (the runtime
right-pads for such graphs; see ``Runtime.generate_batch``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.consumer.runtime import LOGITS_TO_KEEP, attention_shape
from pipeline.errors import PipelineError

GQA_SEQLENS = "gqa_seqlens_k"
GQA_TOTAL = "gqa_total_sequence_length"
COS_CACHE, SIN_CACHE = "gqa_cos_cache", "gqa_sin_cache"


def _yarn_inv_freq(pos_freqs: np.ndarray, dim: int, base: float, scaling: dict, context: int) -> tuple[np.ndarray, float]:
    """YaRN (arXiv 2309.00071) as transformers computes it for Qwen3's ``rope_scaling: {rope_type: yarn,
    factor, original_max_position_embeddings}``: low frequencies interpolated by ``factor``, high ones
    kept, a linear ramp between the correction dims of ``beta_fast``/``beta_slow`` rotations; cos/sin
    scaled by the attention factor 0.1 ln(factor) + 1 (or the config's ``attention_factor``)."""
    import math

    factor = float(scaling["factor"])
    original = int(scaling.get("original_max_position_embeddings") or context)

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention = scaling.get("attention_factor")
    if attention is None:
        m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
        attention = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
    beta_fast, beta_slow = float(scaling.get("beta_fast") or 32), float(scaling.get("beta_slow") or 1)

    def correction_dim(rotations):
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float32)
    keep = (1 - ramp).astype(np.float32)  # 1 = extrapolate (the original frequency)
    extrapolated = (1.0 / pos_freqs).astype(np.float32)
    interpolated = (1.0 / (np.float32(factor) * pos_freqs)).astype(np.float32)
    return (interpolated * (1 - keep) + extrapolated * keep).astype(np.float32), float(attention)


def _llama3_inv_freq(inv_freq: np.ndarray, scaling: dict) -> np.ndarray:
    """Llama 3.1 / 3.2's ``rope_type: llama3`` as transformers computes it: wavelengths longer than
    ``original_max_position_embeddings / low_freq_factor`` divided by ``factor``, shorter than
    ``... / high_freq_factor`` kept, a smooth blend between (in float32, as transformers' tensors are)."""
    import math

    factor = np.float32(scaling["factor"])
    low, high = float(scaling.get("low_freq_factor", 1.0)), float(scaling.get("high_freq_factor", 4.0))
    original = float(scaling["original_max_position_embeddings"])
    wavelen = (np.float32(2 * math.pi) / inv_freq).astype(np.float32)
    scaled = np.where(wavelen > original / low, inv_freq / factor, inv_freq).astype(np.float32)
    smooth = ((original / wavelen - low) / (high - low)).astype(np.float32)
    smoothed = ((1 - smooth) * scaled / factor + smooth * scaled).astype(np.float32)
    medium = ~(wavelen < original / high) & ~(wavelen > original / low)
    return np.where(medium, smoothed, scaled).astype(np.float32)


ROPE_TYPES = ("default", "linear", "yarn", "llama3")


def rotary_caches(config: dict, positions: int) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin (positions, head_dim/2) of a config's RoPE, computed as transformers does (float32
    inverse frequencies, float32 angles, so the caches agree with the export's own rotary subgraph at
    every position): the default RoPE, ``linear`` position interpolation, Llama 3's ``llama3``, or YaRN
    with its attention factor folded into cos and sin (as transformers scales them). Other
    ``rope_scaling`` types (dynamic NTK changes with the sequence length; Phi-3's longrope switches
    tables at the original context) raise one line naming the type."""
    head_dim = attention_shape(config)[2]
    dim = int(head_dim * float(config.get("partial_rotary_factor", 1.0)))
    theta = float(config.get("rope_theta", 10000.0))
    pos_freqs = (np.float32(theta) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))).astype(np.float32)
    inv_freq = (1.0 / pos_freqs).astype(np.float32)
    scaling = config.get("rope_scaling") or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    attention = 1.0
    if kind == "linear":
        inv_freq = (inv_freq / np.float32(scaling["factor"])).astype(np.float32)
    elif kind == "llama3":
        inv_freq = _llama3_inv_freq(inv_freq, scaling)
    elif kind == "yarn":
        inv_freq, attention = _yarn_inv_freq(pos_freqs, dim, theta, scaling,
                                             int(config.get("max_position_embeddings") or positions))
    elif kind != "default":
        raise PipelineError(f"rope_scaling type {kind!r} is not supported by the attention fusion (it supports "
                              f"{', '.join(ROPE_TYPES)}): set fused.attention: none")
    freqs = np.outer(np.arange(positions, dtype=np.float32), inv_freq).astype(np.float32)
    cos, sin = np.cos(freqs.astype(np.float64)), np.sin(freqs.astype(np.float64))
    return (cos * attention).astype(np.float32), (sin * attention).astype(np.float32)


def _rope(op, x, cos, sin):
    """rotate-half RoPE as the export writes it: x*cos + concat(-x[..., D/2:], x[..., :D/2])*sin."""
    from onnxscript.rewriter.pattern import ANY_VALUE as _

    x2 = op.Slice(x, _, _, _, _)
    x1 = op.Slice(x, _, _, _, _)
    return op.Add(op.Mul(x, cos), op.Mul(op.Concat(op.Neg(x2), x1, axis=-1), sin))


def _repeat_kv(op, x):
    from onnxscript.rewriter.pattern import ANY_VALUE as _

    return op.Reshape(op.Expand(op.Unsqueeze(x, _), _), _)


def _partial_rope(op, x, cos, sin):
    """Phi-3's form: the rotary part sliced off (its width read from cos at every step), rotated about its
    half (read back from its shape: the Shape/Gather/Div is part of the pattern, as its only users are),
    concatenated back with the rest (``partial_rotary_factor``; at 1.0 the rest is empty)."""
    from onnxscript.rewriter.pattern import ANY_VALUE as _

    rot = op.Slice(x, _, _, _, _)
    half = op.Div(op.Gather(op.Shape(rot), _), _)
    x1 = op.Slice(rot, _, op.Unsqueeze(half, _), _, _)
    x2 = op.Slice(rot, op.Unsqueeze(half, _), _, _, _)
    rotated = op.Add(op.Mul(rot, cos), op.Mul(op.Concat(op.Neg(x2), x1, axis=-1), sin))
    return op.Concat(rotated, op.Slice(x, _, _, _, _), axis=-1)


def _attention(rope):
    """The export's attention block with RoPE written as ``rope``."""
    def attention_pattern(op, q, k, v, past_k, past_v, cos, sin, mask4d, scale_q, scale_k):
        from onnxscript.rewriter.pattern import ANY_VALUE as _

        q_rot = rope(op, op.Transpose(q, perm=[0, 2, 1, 3]), cos, sin)
        k_rot = rope(op, op.Transpose(k, perm=[0, 2, 1, 3]), cos, sin)
        present_k = op.Concat(past_k, k_rot, axis=-2)
        present_v = op.Concat(past_v, op.Transpose(op.Reshape(v, _), perm=[0, 2, 1, 3]), axis=-2)
        k_all, v_all = _repeat_kv(op, present_k), _repeat_kv(op, present_v)
        scores = op.MatMul(op.Mul(q_rot, scale_q), op.Mul(op.Transpose(k_all, perm=[0, 1, 3, 2]), scale_k))
        key_len = op.Unsqueeze(op.Gather(op.Shape(k_all), _), _)
        bias = op.Where(op.Slice(mask4d, _, key_len, _, _), _, _)
        probs = op.Softmax(op.Add(scores, bias), axis=-1)
        probs = op.Where(op.IsNaN(probs), _, probs)
        out = op.Transpose(op.MatMul(probs, v_all), perm=[0, 2, 1, 3])
        return op.Reshape(out, _), present_k, present_v
    return attention_pattern


def _projection_reshape(op, src, w, i0, i1, a0, a1, c2, c3):
    """Reshape(src @ W, Concat(Shape(src)[0], Shape(src)[1], c2, c3)): the export's per-head split of a
    projection, its batch and sequence sizes read back from the projection's input at every step."""
    dims = [op.Unsqueeze(op.Gather(op.Shape(src), i), a) for i, a in ((i0, a0), (i1, a1))]
    return op.Reshape(op.MatMul(src, w), op.Concat(*dims, c2, c3, axis=0))


def static_split_rule():
    """Replace that shape arithmetic with the constant ``[0, 0, c2, c3]`` (0 = keep the input's
    size): sound because a MatMul keeps its input's leading dims. 5 nodes fewer per projection."""
    from onnxscript.rewriter import _ir_utils, pattern

    def values(*vs):
        return [_ir_utils.get_singleton_value(v) for v in vs]

    def check(context, src, i0, i1, c2, c3, **_):
        got = values(i0, i1, c2, c3)
        if any(g is None for g in got) or got[:2] != [0, 1]:
            return pattern.MatchResult().fail("not a (batch, seq, c2, c3) split", [i0, i1, c2, c3])
        return True

    def replacement(op, src, w, c2, c3, **_):
        import onnx_ir as ir

        shape = np.array([0, 0, *values(c2, c3)], dtype=np.int64)
        return op.Reshape(op.MatMul(src, w), op.Constant(value=ir.tensor(shape)))

    # the Shape/Gather pair is shared by the q and k splits: keep matched nodes, dead ones are removed after
    return pattern.RewriteRule(_projection_reshape, replacement, check, name="StaticHeadSplit", remove_nodes=False)


def _gqa_with_projections(op, x, wq, wk, wv, q_shape, k_shape, q_gamma, k_gamma, flat_q, flat_k, past_k, past_v,
                          seqlens, total, cos, sin):
    """A fused layer's GroupQueryAttention with its three projections of one input ``x``, QK-norm'd (Qwen3)."""
    q = op.SimplifiedLayerNormalization(op.Reshape(op.MatMul(x, wq), q_shape), q_gamma, _outputs=["q_norm"])
    k = op.SimplifiedLayerNormalization(op.Reshape(op.MatMul(x, wk), k_shape), k_gamma, _outputs=["k_norm"])
    return op.GroupQueryAttention(op.Reshape(q, flat_q), op.Reshape(k, flat_k), op.MatMul(x, wv), past_k, past_v,
                                  seqlens, total, cos, sin, _domain="com.microsoft", _outputs=["attn", "pk", "pv"])


def _gqa_with_plain_projections(op, x, wq, wk, wv, q_shape, k_shape, flat_q, flat_k, past_k, past_v, seqlens,
                                total, cos, sin):
    """The same without QK-norm (Llama, Mistral): the per-head split and its flattening cancel out."""
    q = op.Reshape(op.Reshape(op.MatMul(x, wq), q_shape), flat_q)
    k = op.Reshape(op.Reshape(op.MatMul(x, wk), k_shape), flat_k)
    return op.GroupQueryAttention(q, k, op.MatMul(x, wv), past_k, past_v, seqlens, total, cos, sin,
                                  _domain="com.microsoft", _outputs=["attn", "pk", "pv"])


def _gqa_with_biased_projections(op, x, wq, wk, wv, bq, bk, bv, q_shape, k_shape, flat_q, flat_k, past_k, past_v,
                                 seqlens, total, cos, sin):
    """With q/k/v biases (Qwen2 / Qwen2.5)."""
    q = op.Reshape(op.Reshape(op.Add(op.MatMul(x, wq), bq), q_shape), flat_q)
    k = op.Reshape(op.Reshape(op.Add(op.MatMul(x, wk), bk), k_shape), flat_k)
    return op.GroupQueryAttention(q, k, op.Add(op.MatMul(x, wv), bv), past_k, past_v, seqlens, total, cos, sin,
                                  _domain="com.microsoft", _outputs=["attn", "pk", "pv"])


def packed_qkv_rules(graph, heads: int, kv_heads: int, head_dim: int, form: str) -> list:
    """Q, K and V projections of one input -> one MatMul over the concatenated weights (and one Add of the
    concatenated biases) + Split, as onnxruntime-genai's builder packs them (fewer, larger kernels).
    One rule per form of the projections the families have: QK-norm'd, plain, biased; ``form`` (the
    family's ``projections``) picks the one to apply. Each is rooted at
    the GroupQueryAttention the projections feed (so the three MatMuls are told apart); the packed
    tensors are added to ``graph`` and the old ones are dropped as unused."""
    import onnx_ir as ir
    from onnxscript.rewriter import pattern

    kv_width = kv_heads * head_dim

    def consts(*vs):
        return [v.const_value if v.const_value is not None and v.is_initializer() else None for v in vs]

    def check(context, wq, wk, wv, bq=None, bk=None, bv=None, **_):
        tensors = consts(wq, wk, wv)
        if any(t is None or len(t.shape) != 2 for t in tensors):
            return pattern.MatchResult().fail("q/k/v weights are not 2-D initializers", [wq, wk, wv])
        q, k, v = tensors
        if not (q.shape[0] == k.shape[0] == v.shape[0] and k.shape[1] == v.shape[1] == kv_width
                and q.shape[1] == heads * head_dim and q.dtype == k.dtype == v.dtype):
            return pattern.MatchResult().fail("not the q/k/v projections of one attention", [wq, wk, wv])
        if bq is not None:
            biases = consts(bq, bk, bv)
            if any(b is None or tuple(b.shape) != (t.shape[1],) for b, t in zip(biases, tensors)):
                return pattern.MatchResult().fail("q/k/v biases are not 1-D initializers of their widths",
                                                  [bq, bk, bv])
        return True

    def pack(first, parts, axis: int, suffix: str):
        """One lazy initializer: concatenated when saved, one layer at a time (never all in memory)."""
        name = (first.name.replace("q_proj", "qkv_proj") if "q_proj" in first.name else f"{first.name}_qkv") + suffix
        tensors = consts(*parts)
        shape = list(tensors[0].shape)
        shape[axis] = sum(t.shape[axis] for t in tensors)
        lazy = ir.LazyTensor(lambda: ir.tensor(np.concatenate([t.numpy() for t in tensors], axis=axis)),
                             dtype=tensors[0].dtype, shape=ir.Shape(shape), name=name)
        value = ir.Value(name=name, const_value=lazy)
        graph.register_initializer(value)
        return value

    def split(op, x, wq, wk, wv, biases=None):
        width = consts(wq)[0].shape[1]
        sizes = op.Constant(value=ir.tensor(np.array([width, kv_width, kv_width], dtype=np.int64)))
        y = op.MatMul(x, pack(wq, (wq, wk, wv), 1, ""))
        if biases:
            y = op.Add(y, pack(biases[0], biases, 0, ""))
        return op.Split(y, sizes, axis=-1, _outputs=3)

    def gqa(op, q, k, v, past_k, past_v, seqlens, total, cos, sin, attn):
        return op.GroupQueryAttention(q, k, v, past_k, past_v, seqlens, total, cos, sin,
                                      **attn.producer().attributes, _domain="com.microsoft", _outputs=3)

    def normed(op, x, wq, wk, wv, q_shape, k_shape, q_gamma, k_gamma, flat_q, flat_k, past_k, past_v,
               seqlens, total, cos, sin, q_norm, k_norm, attn, **_):
        q2, k2, v2 = split(op, x, wq, wk, wv)
        qn = op.SimplifiedLayerNormalization(op.Reshape(q2, q_shape), q_gamma, **q_norm.producer().attributes)
        kn = op.SimplifiedLayerNormalization(op.Reshape(k2, k_shape), k_gamma, **k_norm.producer().attributes)
        return gqa(op, op.Reshape(qn, flat_q), op.Reshape(kn, flat_k), v2, past_k, past_v, seqlens, total, cos, sin,
                   attn)

    def plain(op, x, wq, wk, wv, past_k, past_v, seqlens, total, cos, sin, attn, **_):
        return gqa(op, *split(op, x, wq, wk, wv), past_k, past_v, seqlens, total, cos, sin, attn)

    def biased(op, x, wq, wk, wv, bq, bk, bv, past_k, past_v, seqlens, total, cos, sin, attn, **_):
        return gqa(op, *split(op, x, wq, wk, wv, (bq, bk, bv)), past_k, past_v, seqlens, total, cos, sin, attn)

    rules = {"qk_norm": [pattern.RewriteRule(_gqa_with_projections, normed, check, name="PackedQKV")],
             # the bias may be either operand of its Add: every order of them
             "bias": pattern.RewriteRule(_gqa_with_biased_projections, biased, check, name="PackedBiasedQKV").commute(),
             "plain": [pattern.RewriteRule(_gqa_with_plain_projections, plain, check, name="PackedPlainQKV")],
             "packed": []}  # one projection already
    return rules[form]


def gqa_rule(num_heads: int, kv_heads: int, seqlens, total, cos_cache, sin_cache, flat, window: int | None = None):
    """The rewrite rules (RoPE over the whole head, or Phi-3's sliced form), bound to the graph's sequence-length values and rotary caches; ``window``: the
    model's sliding attention window (its family's ``window``), carried as GroupQueryAttention's
    ``local_window_size``."""
    # ORT's local_window_size counts as transformers' sliding_window does (the token itself included):
    # the fused graph of a Mistral with a 16-token window equals the export past it, prefill, batch and
    # decode path (tests/test_families.py)
    local = {} if window is None else {"local_window_size": window}
    from onnxscript.rewriter import _ir_utils, pattern

    def check(context, scale_q, scale_k, **_):
        result = pattern.MatchResult()
        for s in (scale_q, scale_k):
            if _ir_utils.get_singleton_value(s) is None:
                return result.fail("attention scale is not a constant", s)
        return True

    def replacement(op, q, k, v, scale_q, scale_k, past_k, past_v, **_):
        scale = float(_ir_utils.get_singleton_value(scale_q)) * float(_ir_utils.get_singleton_value(scale_k))
        return op.GroupQueryAttention(
            op.Reshape(q, flat), op.Reshape(k, flat), v, past_k, past_v, seqlens, total, cos_cache, sin_cache,
            num_heads=num_heads, kv_num_heads=kv_heads, do_rotary=1, rotary_interleaved=0, scale=scale, **local,
            _domain="com.microsoft", _outputs=3)

    return [pattern.RewriteRule(_attention(_rope), replacement, check, name="GroupQueryAttention"),
            pattern.RewriteRule(_attention(_partial_rope), replacement, check, name="PartialRopeGroupQueryAttention")]


# The name ORT prints when a left-padded batch reaches the guard below: the whole message a user sees.
LEFT_PADDING_REFUSED = ("left padding is not supported: GroupQueryAttention reads each row's length from "
                        "attention_mask, so a row whose first mask value is 0 would get another row's tokens. "
                        "Batch with onnxruntime-genai or `pipeline generate` (they pad on the right), or use "
                        "the export artifact with optimum")


def _left_padding_guard(graph, mask, const) -> list:
    """Nodes that make a left-padded batch fail with :data:`LEFT_PADDING_REFUSED` instead of silently
    returning wrong tokens (optimum's batched ``generate`` left-pads, as transformers recommends). The
    last node's output is a (1,) int32 zero to add to the lengths; when some row's mask starts with 0 its
    Reshape is asked for a dimension of -2, which ONNX Runtime refuses, naming the node. Right-padded
    batches (genai, our runtime) and single sequences start every row with 1. Written by hand: ONNX has
    no assert op, and no rewrite pattern applies (this adds a check, it replaces nothing)."""
    import onnx_ir as ir

    zero = const("left_padding_zero", np.array(0, dtype=mask.dtype.numpy()))
    col0 = const("left_padding_col0", np.array(0, dtype=np.int64))
    first = ir.node("Gather", [mask, col0], attributes={"axis": 1}, name="left_padding/first_column")
    lowest = ir.node("ReduceMin", [first.outputs[0]], attributes={"keepdims": 0}, name="left_padding/min")
    padded = ir.node("Equal", [lowest.outputs[0], zero], name="left_padding/starts_with_0")
    shape = ir.node("Where", [padded.outputs[0], const("left_padding_refuse", np.array([-2], dtype=np.int64)),
                              const("left_padding_accept", np.array([1], dtype=np.int64))], name="left_padding/shape")
    check = ir.node("Reshape", [const("left_padding_lengths_zero", np.array([0], dtype=np.int32)), shape.outputs[0]],
                    name=LEFT_PADDING_REFUSED)
    return [first, lowest, padded, shape, check]


def fuse_attention(model, config: dict, max_positions: int, family):
    """Fuse every layer's attention of an onnx-ir ``model`` into GroupQueryAttention, its projections
    packed in the form ``family`` (pipeline/families/) declares; returns (the model, how many attention
    blocks fused, how many of them got packed projections). Weights stay lazy (see onnx_io.load_ir).

    Adds the sequence-length subgraph (from ``attention_mask``) and the rotary caches once; the
    export's own mask and rotary subgraphs become dead and are removed."""
    import onnx_ir as ir
    from onnxscript.rewriter import rewrite

    graph = model.graph
    mask = next((v for v in graph.inputs if v.name == "attention_mask"), None)
    if mask is None:
        return model, 0, 0
    heads, kv_heads, head_dim = attention_shape(config)
    cos, sin = rotary_caches(config, max_positions)
    cos_v = ir.Value(name=COS_CACHE, const_value=ir.tensor(cos, name=COS_CACHE))
    sin_v = ir.Value(name=SIN_CACHE, const_value=ir.tensor(sin, name=SIN_CACHE))
    graph.register_initializer(cos_v)
    graph.register_initializer(sin_v)

    def const(name, array):
        v = ir.Value(name=name, const_value=ir.tensor(np.asarray(array), name=name))
        graph.register_initializer(v)
        return v

    one = const("gqa_one_1d", np.array([1], dtype=np.int64))
    one32 = const("gqa_one_i32", np.array(1, dtype=np.int32))
    flat = const("gqa_flat_shape", np.array([0, 0, -1], dtype=np.int64))  # (B, S, H, D) -> (B, S, H*D)
    summed = ir.node("ReduceSum", [mask, one], attributes={"keepdims": 0}, name="gqa/ReduceSum")
    cast = ir.node("Cast", [summed.outputs[0]], attributes={"to": ir.DataType.INT32}, name="gqa/Cast")
    guard = _left_padding_guard(graph, mask, const)
    guarded = ir.node("Add", [cast.outputs[0], guard[-1].outputs[0]], name="gqa/guarded_lengths")
    seqlens = ir.node("Sub", [guarded.outputs[0], one32], name="gqa/seqlens_k")
    seqlens.outputs[0].name = GQA_SEQLENS
    shape = ir.node("Shape", [mask], attributes={"start": 1, "end": 2}, name="gqa/Shape")
    total64 = ir.node("Squeeze", [shape.outputs[0]], name="gqa/Squeeze")
    total = ir.node("Cast", [total64.outputs[0]], attributes={"to": ir.DataType.INT32}, name="gqa/total")
    total.outputs[0].name = GQA_TOTAL
    new_nodes = [summed, cast, *guard, guarded, seqlens, shape, total64, total]
    for i, n in enumerate(new_nodes):
        graph.insert_before(graph[0], n) if i == 0 else graph.insert_after(new_nodes[i - 1], n)

    before = sum(1 for n in graph if n.op_type == "GroupQueryAttention")
    rules = gqa_rule(heads, kv_heads, seqlens.outputs[0], total.outputs[0], cos_v, sin_v, flat, family.window(config))
    model = rewrite(model, pattern_rewrite_rules=[*rules, static_split_rule()])
    fused = sum(1 for n in model.graph if n.op_type == "GroupQueryAttention") - before
    # counted by the packed initializers: a rule's own count includes the matches of its commuted forms
    packed_before = sum(1 for n in model.graph if n.op_type == "Split")
    model = rewrite(model, pattern_rewrite_rules=packed_qkv_rules(model.graph, heads, kv_heads, head_dim,
                                                                  family.projections))
    packed = fused if family.projections == "packed" else sum(1 for n in model.graph if n.op_type == "Split") - packed_before
    if not any(d == "com.microsoft" for d in model.opset_imports):
        model.opset_imports["com.microsoft"] = 1
    return model, fused, packed


# ------------------------------------------------------------------------------- logits where used
def _lm_head_pattern(op, hidden, weight):
    return op.MatMul(hidden, weight)


def select_logits(model) -> int:
    """Give the graph an input ``logits_to_keep`` (int64 scalar, HF's name and meaning: the lm_head runs
    on the last N positions only; 0 = every position) and slice the lm_head's input by it. The input
    is also an initializer holding 0, so it is optional: ONNX Runtime, optimum and onnxruntime-genai
    see the graph they saw before (every position's logits) unless they feed it. Generation feeds 1
    (a 32k-token prompt would otherwise make 32k x vocab float32 logits: 20 GB at Qwen3's vocab);
    evaluation feeds the scored positions' count. Returns 1 if the lm_head was found, else 0.

    A rewrite rule rooted at the MatMul whose output is the graph's ``logits``; the parity check of
    the stage proves the default path unchanged."""
    import onnx_ir as ir
    from onnxscript.rewriter import pattern, rewrite

    graph = model.graph
    if any(v.name == LOGITS_TO_KEEP for v in graph.inputs):
        return 0
    logits = next((v for v in graph.outputs if v.name == "logits"), None)
    if logits is None or logits.producer() is None or logits.producer().op_type != "MatMul":
        return 0
    keep = ir.Value(name=LOGITS_TO_KEEP, shape=ir.Shape([]), type=ir.TensorType(ir.DataType.INT64),
                    const_value=ir.tensor(np.array(0, dtype=np.int64), name=LOGITS_TO_KEEP))
    graph.register_initializer(keep)
    graph.inputs.append(keep)
    found = []

    def check(context, hidden, weight, **_):
        if context.root.outputs[0] is not logits:
            return pattern.MatchResult().fail("not the MatMul that makes the logits", [hidden])
        return True

    def replacement(op, hidden, weight, **_):
        found.append(1)
        # Slice(hidden, -keep, INT64_MAX, axis 1): the last `keep` positions; -0 = 0 = all of them
        start = op.Reshape(op.Neg(keep), op.Constant(value=ir.tensor(np.array([1], dtype=np.int64))))
        end = op.Constant(value=ir.tensor(np.array([np.iinfo(np.int64).max], dtype=np.int64)))
        axis = op.Constant(value=ir.tensor(np.array([1], dtype=np.int64)))
        return op.MatMul(op.Slice(hidden, start, end, axis), weight)

    rule = pattern.RewriteRule(_lm_head_pattern, replacement, check, name="LogitsToKeep")
    rewritten = rewrite(model, pattern_rewrite_rules=[rule])
    if rewritten is not model:
        model.graph = rewritten.graph  # pragma: no cover - rewrite works in place on an ir.Model
    if not found:
        graph.inputs.remove(keep)
        graph.initializers.pop(LOGITS_TO_KEEP)
    return len(found)


# ------------------------------------------------------------------------------------------ int8 KV cache
def int8_kv_cache(model, amax: dict[str, float]) -> int:
    """Store every GroupQueryAttention's KV cache as int8 (``kv_cache_bit_width`` 8, ``PER_TENSOR``
    scales, ORT >= 1.23's CPU and CUDA kernels quantize on write and dequantize on read): a quarter of
    the float32 cache's bytes. ``amax``: ``present.<layer>.key|value`` -> max |x| measured on
    calibration text (the imatrix stage records them); scale = amax / 127. ``model``: a ModelProto,
    graph only (the weights stay in their external file). Returns how many attention nodes changed.

    Written on the ModelProto rather than as a rewrite pattern: it changes attributes, the graph's I/O
    types and two inputs of a node that is already the fusion's output, which is nothing to match."""
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    changed = 0
    for node in graph.node:
        if node.op_type != "GroupQueryAttention" or len(node.input) < 5:
            continue
        layer = _past_layer(node.input[3])
        if layer is None:
            continue
        scales = []
        for kind in ("key", "value"):
            peak = amax.get(f"present.{layer}.{kind}")
            if peak is None:
                from pipeline.errors import PipelineError

                raise PipelineError(f"no calibration maximum for present.{layer}.{kind}: rebuild the imatrix "
                                    f"(it records the KV cache's range)")
            name = f"kv_int8_{kind}_scale_{layer}"
            graph.initializer.append(numpy_helper.from_array(np.array([max(peak, 1e-8) / 127.0], np.float32), name))
            scales.append(name)
        inputs = list(node.input) + [""] * max(0, 12 - len(node.input))
        del node.input[:]
        node.input.extend(inputs[:12] + scales)  # k_scale, v_scale follow position_ids, attention_bias, head_sink
        node.attribute.extend([helper.make_attribute("k_quant_type", "PER_TENSOR"),
                               helper.make_attribute("v_quant_type", "PER_TENSOR"),
                               helper.make_attribute("kv_cache_bit_width", 8)])
        changed += 1
    for value in list(graph.input) + list(graph.output):
        if value.name.startswith(("past_key_values.", "present.")):
            value.type.tensor_type.elem_type = TensorProto.INT8
    return changed


def int8_kv_artifact(directory, amax: dict[str, float]) -> dict:
    """:func:`int8_kv_cache` on the graph of the artifact being built in ``directory`` (its weights file
    untouched); returns the policy the manifest records."""
    import onnx

    path = Path(directory) / "model.onnx"
    model = onnx.load(str(path), load_external_data=False)
    n = int8_kv_cache(model, amax)
    onnx.save(model, str(path))
    return {"kv_cache": "int8", "scales": "per tensor, max |x| / 127 on calibration text (imatrix)",
            "attention_nodes": n}


def _past_layer(name: str) -> str | None:
    parts = name.split(".")
    return parts[1] if len(parts) == 3 and parts[0] == "past_key_values" and parts[1].isdigit() else None
