"""Decode steps that read each KV group once (pipeline/graph/decode.py): the runtime's rewritten session
against the artifact's own GroupQueryAttention, on the same artifact, every path the runtime has."""

import numpy as np
import onnx
import pytest

from pipeline.consumer.runtime import Runtime


def _gqa_nodes(directory) -> int:
    graph = onnx.load(str(directory / "model.onnx"), load_external_data=False).graph
    return sum(n.op_type == "GroupQueryAttention" for n in graph.node)


@pytest.mark.parametrize("name", ["fused", "int4", "int8-dynamic"])
def test_grouped_decode_steps_give_the_kernels_logits(derived, data_dir, name):
    """From the first position on (grouped_from=1), the decode path's distributions equal the kernel's at
    every step (float32 graphs to float rounding; where MatMulNBits quantizes its input activations a
    rounding apart can flip one int8 step, so there the distributions are compared), greedy tokens and a
    ragged batch's tokens too; every attention node got the branch."""
    directory = derived(name)
    kernel, grouped = Runtime(directory, grouped_from=None), Runtime(directory, grouped_from=1)
    assert kernel.grouped_layers == 0 and grouped.grouped_layers == _gqa_nodes(directory) > 0
    ids = kernel.encode((data_dir / "eval.txt").read_text())[:96]
    a, b = kernel.decode_path_logits(ids, prefix=8), grouped.decode_path_logits(ids, prefix=8)
    assert np.isfinite(b).all()
    if name == "fused":
        assert np.abs(a - b).max() < 1e-4, np.abs(a - b).max()
    la, lb = (x - x.max(-1, keepdims=True) for x in (a, b))
    la, lb = (x - np.log(np.exp(x).sum(-1, keepdims=True)) for x in (la, lb))
    kld = (np.exp(la) * (la - lb)).sum(-1)
    assert kld.max() < 1e-5 and kld.mean() < 1e-6, (kld.mean(), kld.max())
    assert (a.argmax(-1) == b.argmax(-1)).all()
    prompts = [ids[:5], ids[10:31], ids[40:52]]
    assert kernel.generate_batch(prompts, 12, stop_at_eos=False) == grouped.generate_batch(prompts, 12, stop_at_eos=False)


def test_a_concatenated_past_and_short_depths_keep_the_kernel(derived, data_dir):
    """The rewritten session still runs optimum's way (a past with no room for the step: the kernel
    concatenates), and below grouped_from the kernel runs: the same logits either way."""
    directory = derived("int4")
    kernel, grouped = Runtime(directory, grouped_from=None), Runtime(directory, grouped_from=1)
    ids = np.array([kernel.encode((data_dir / "eval.txt").read_text())[:24]])
    last = []
    for rt in (kernel, grouped):
        out, past = rt.forward(ids[:, :20])
        for i in range(20, 24):
            out, past = rt.forward(ids[:, i:i + 1], past)
        last.append(out)
    assert np.abs(last[0] - last[1]).max() < 1e-4
    late = Runtime(directory, grouped_from=10_000)
    assert np.abs(late.decode_path_logits(ids[0], 4) - kernel.decode_path_logits(ids[0], 4)).max() == 0


def test_what_the_grouped_branch_does_not_reproduce_keeps_the_kernel(derived):
    """A float16 cache (the fp16 artifact: ORT's CPU FusedMatMul is float32 only) is left to the kernel."""
    assert Runtime(derived("fp16"), grouped_from=1).grouped_layers == 0
