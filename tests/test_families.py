"""Other families than Qwen3 through the stages whose graph differs: tiny random-weight checkpoints made
with transformers' own classes (hidden 256, 4 layers, 8 heads / 2 KV heads, the built-in tokenizer),
as a user would bring them (issue: model families). What each adds to the graph:

- Llama 3.1 (``LlamaForCausalLM``, untied lm_head): no QK-norm, two stored tables;
- Mistral (``MistralForCausalLM``) with a 16-token sliding window, far below the eval windows and the
  decode path, so a fused graph that dropped the window could not pass parity;
- Qwen2.5 (``Qwen2ForCausalLM``): q/k/v biases;
- Llama 3.2 (tied, ``rope_type: llama3`` with an original context of 64, so the scaling changes the
  rotary caches within the eval windows);
- Phi-3 (``Phi3ForCausalLM``): q/k/v in one ``qkv_proj``, gate/up in one ``gate_up_proj``, its RoPE
  sliced off and concatenated back, untied lm_head."""

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from pipeline.graph.onnx_io import op_counts
from tests.conftest import assert_clean_failure, build, genai_greedy, run_cli, scoring, small_params

LAYERS, WINDOW = 4, 16
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}


def _checkpoint(kind: str, tokenizer_dir: Path, dst: Path) -> Path:
    import torch
    import transformers as hf

    vocab = json.loads((tokenizer_dir / "config.json").read_text())["vocab_size"]
    common = dict(vocab_size=vocab, hidden_size=256, intermediate_size=512, num_hidden_layers=LAYERS,
                  num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512)
    config, cls = {"llama": (hf.LlamaConfig(**common, tie_word_embeddings=False), hf.LlamaForCausalLM),
                   "mistral": (hf.MistralConfig(**common, tie_word_embeddings=False, sliding_window=WINDOW),
                               hf.MistralForCausalLM),
                   "qwen2": (hf.Qwen2Config(**common, tie_word_embeddings=True), hf.Qwen2ForCausalLM),
                   "llama32": (hf.LlamaConfig(**common, tie_word_embeddings=True, rope_theta=500000.0,
                                              rope_scaling=LLAMA3_ROPE), hf.LlamaForCausalLM),
                   # input sizes that are not multiples of INT4's blocks of 128 (as SmolLM2-135M's 576)
                   "phi3": (hf.Phi3Config(**common, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1,
                                          eos_token_id=2), hf.Phi3ForCausalLM),
                   "phi3-partial": (hf.Phi3Config(**common, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1,
                                                  eos_token_id=2, partial_rotary_factor=0.5), hf.Phi3ForCausalLM),
                   "odd": (hf.LlamaConfig(**{**common, "hidden_size": 192, "num_attention_heads": 6,
                                             "intermediate_size": 320}, tie_word_embeddings=True),
                           hf.LlamaForCausalLM)}[kind]
    torch.manual_seed(0)
    cls(config).save_pretrained(dst)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        shutil.copy2(tokenizer_dir / name, dst / name)
    return dst


@pytest.fixture(scope="module")
def family(checkpoint_dir, data_dir, tmp_path_factory):
    """family('llama') -> {stage: directory}, built once: checkpoint, export, fused."""
    built = {}

    def make(kind: str) -> dict:
        if kind not in built:
            root = tmp_path_factory.mktemp(kind)
            source = _checkpoint(kind, checkpoint_dir, root / "source")
            params = small_params(f"model.source={source}")
            dirs = {"checkpoint": root / "checkpoint", "export": root / "export", "fused": root / "fused"}
            build("checkpoint", params, data_dir, dirs["checkpoint"])
            build("export", params, dirs["checkpoint"], dirs["export"], scoring(params, data_dir, dirs["checkpoint"]))
            build("fused", params, dirs["export"], dirs["fused"], scoring(params, data_dir, dirs["export"]))
            built[kind] = dirs | {"params": params}
        return built[kind]
    return make


def _graph(directory: Path):
    return onnx.load(str(directory / "model.onnx"), load_external_data=False)


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "llama32", "phi3"])
def test_every_family_fuses_one_packed_attention_per_layer(family, kind):
    """One GroupQueryAttention per layer, fed by one MatMul over the packed q/k/v weights (with the packed
    biases for Qwen2.5): the QK-norm of Qwen3 is not needed for the packing."""
    dirs = family(kind)
    graph = _graph(dirs["fused"])
    ops = op_counts(graph)
    assert ops["GroupQueryAttention"] == LAYERS
    packed = [n for n in graph.graph.node if n.op_type == "MatMul" and "qkv" in n.input[1]]
    assert len(packed) == LAYERS, [n.input[1] for n in graph.graph.node if n.op_type == "MatMul"]
    assert not [n for n in graph.graph.node if n.op_type == "MatMul" and n.input[1].endswith(("q_proj.weight",
                                                                                                "k_proj.weight"))]
    # 1 packed qkv + o + gate + up + down per layer (Phi-3's gate and up are one), and the lm_head
    assert ops["MatMul"] == (4 if kind == "phi3" else 5) * LAYERS + 1
    m = json.loads((dirs["fused"] / "manifest.json").read_text())["metrics"]
    assert m["eval"]["kld_mean"] < 1e-9 and m["eval"]["top1_agreement"] == 1.0, m["eval"]
    assert m["packed_qkv_layers"] == LAYERS


# kind -> the family (pipeline/families/) it is a checkpoint of; Qwen3 is the built-in model every test uses
KINDS = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "llama32": "llama", "odd": "llama", "phi3": "phi3"}


def test_every_declared_family_has_a_checkpoint_here():
    """A family is one file in pipeline/families/ plus its tests: a declaration without a checkpoint in
    this file would go unchecked."""
    from pipeline import families

    assert set(families.all_families()) == set(KINDS.values()) | {"qwen3"}


def test_attention_windows_that_differ_by_layer_are_refused_in_one_line(family, tmp_path):
    """Qwen2's ``use_sliding_window`` windows only the layers from ``max_window_layers`` on: one
    GroupQueryAttention window for all would be wrong, so the fused stage says so before any work."""
    from tests.test_verify import rehash

    export = Path(shutil.copytree(family("qwen2")["export"], tmp_path / "export"))
    config = json.loads((export / "config.json").read_text())
    (export / "config.json").write_text(json.dumps({**config, "use_sliding_window": True, "sliding_window": 8,
                                                    "max_window_layers": 2}))
    rehash(export)
    proc = run_cli("fuse", "--input", str(export), "--out", str(tmp_path / "fused"), "--no-eval")
    assert_clean_failure(proc, "use_sliding_window", "fused.attention: none")
    assert not (tmp_path / "fused").exists()


def test_llama3_rotary_caches_equal_transformers():
    """The fused graph's cos/sin caches for ``rope_type: llama3``, against transformers' own rotary
    embedding at every position (the end-to-end check is the fused llama32 graph's parity above)."""
    import numpy as np
    import torch
    import transformers as hf

    from pipeline.graph.fusions import rotary_caches

    config = hf.LlamaConfig(hidden_size=256, num_attention_heads=8, num_key_value_heads=2, rope_theta=500000.0,
                            max_position_embeddings=512, rope_scaling=LLAMA3_ROPE)
    cos, sin = hf.models.llama.modeling_llama.LlamaRotaryEmbedding(config)(torch.zeros(1), torch.arange(512)[None])
    ours = rotary_caches(config.to_dict(), 512)
    half = ours[0].shape[1]
    assert np.abs(cos[0, :, :half].numpy() - ours[0]).max() < 1e-6
    assert np.abs(sin[0, :, :half].numpy() - ours[1]).max() < 1e-6
    plain = rotary_caches({**config.to_dict(), "rope_scaling": None}, 512)
    assert np.abs(plain[0] - ours[0]).max() > 0.1  # the scaling does change the caches at these positions


def test_a_sliding_window_is_carried_into_the_fused_attention(family):
    dirs = family("mistral")
    windows = {a.i for n in _graph(dirs["fused"]).graph.node if n.op_type == "GroupQueryAttention"
               for a in n.attribute if a.name == "local_window_size"}
    assert windows == {WINDOW}
    parity = json.loads((dirs["fused"] / "manifest.json").read_text())["metrics"]["parity_vs_parent"]
    assert parity["decode_positions"] > WINDOW and parity["decode_top1_agreement"] == 1.0, parity
    # the eval windows reach past it too: the export (PyTorch's mask) and the fused graph agree there
    assert small_params().eval.ctx > 2 * WINDOW


@pytest.mark.parametrize("kind", ["llama", "phi3"])
def test_an_untied_lm_head_goes_through_calibration_and_quantization(family, data_dir, kind):
    from tests.conftest import calibrated

    dirs = family(kind)
    params = calibrated(data_dir)
    root = dirs["fused"].parent
    build("imatrix", params, dirs["fused"], root / "imatrix")
    for name in ("int4", "int8-dynamic"):
        manifest = build(name, params, dirs["fused"], root / name, scoring(params, data_dir, dirs["export"]),
                         uses={"imatrix": root / "imatrix"})
        assert manifest["metrics"]["eval"]["top1_agreement"] > 0.3, manifest["metrics"]["eval"]


def test_the_reference_is_taken_from_the_inputs_lineage(family, export_dir, tmp_path):
    """`pipeline fuse --input OTHER/export` scores against that model's export, not the repository's
    (here: the built-in model's, given as --reference as the default artifacts/export would be)."""
    dirs = family("qwen2")
    data = str(export_dir.parent / "data")
    out = tmp_path / "fused"
    proc = run_cli("fuse", "--input", str(dirs["export"]), "--out", str(out), "--reference", str(export_dir),
                   "--data", data, check=True)
    assert "is another model's" in proc.stderr
    m = json.loads((out / "manifest.json").read_text())["metrics"]["eval"]
    assert m["reference_id"] == json.loads((dirs["export"] / "manifest.json").read_text())["artifact_id"]
    # without that model's export beside its input: one line, nothing scored against the wrong model
    lone = tmp_path / "lone"
    shutil.copytree(dirs["fused"], lone / "fused")
    proc = run_cli("quantize", "--mode", "int4", "--algorithm", "rtn", "--input", str(lone / "fused"), "--out",
                   str(tmp_path / "int4"), "--reference", str(export_dir), "--data", data)
    assert_clean_failure(proc, "is not in the lineage", "--reference")
    assert not (tmp_path / "int4").exists()


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "llama32", "phi3"])
def test_onnxruntime_genai_runs_each_family_as_shipped(family, kind, data_dir):
    """genai_config.json names the family's model type and its special tokens (from the tokenizer where
    config.json leaves them null, as Qwen2's defaults do); onnxruntime-genai's own runtime gives our
    runtime's greedy tokens, on a prompt longer than Mistral's window."""
    from pipeline.consumer.runtime import Runtime

    d = family(kind)["fused"]
    assert json.loads((d / "genai_config.json").read_text())["model"]["type"] == {"llama32": "llama"}.get(kind, kind)
    rt = Runtime(d)
    ids = rt.encode((data_dir / "eval.txt").read_text()[:400])[:40]
    assert len(ids) > 2 * WINDOW
    new = genai_greedy(d, ids, 24)
    assert new and new == rt.generate(ids, len(new))


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_the_outlier_copy_preserves_each_familys_function(checkpoint_dir, tmp_path, kind):
    """The hard case for quantization (pipeline/outliers.py) on every family: its norms and projections are
    where the family's declaration says (Phi-3's gate_up_proj holds up's rows second); the logits are
    the same bit for bit, and the projections' inputs do carry the outlier channels."""
    import torch
    import transformers as hf

    from pipeline import outliers

    src = _checkpoint(kind, checkpoint_dir, tmp_path / "src")
    dst = Path(shutil.copytree(src, tmp_path / "outliers"))
    done = outliers.inject(dst, channels=4, scale=256.0)
    ids = torch.randint(0, 1000, (1, 48), generator=torch.Generator().manual_seed(0))
    before, after = (hf.AutoModelForCausalLM.from_pretrained(d) for d in (src, dst))
    with torch.no_grad():
        assert torch.equal(before(ids).logits, after(ids).logits)
        norm = after.model.layers[0].post_attention_layernorm.weight
    assert (norm[done["hidden_channels"]].abs() >= 100 * norm.abs().median()).all()


def test_the_builtin_recipe_trains_each_familys_architecture(data_dir, tmp_path):
    """builtin:<family>-tiny: the built-in tokenizer and training loop with another family's class (a few
    steps here; benchmarks/families_trained.py trains each fully and runs every stage)."""
    params = small_params("model.source=builtin:phi3-tiny", "train.steps=4")
    manifest = build("checkpoint", params, data_dir, tmp_path / "ck")
    assert manifest["config"]["model_type"] == "phi3" and manifest["source"]["model"] == "builtin:phi3-tiny"
    assert manifest["metrics"]["params_m"] > 1


# Not phi3: optimum-onnx 0.1.0's ORTModelForCausalLM gives phi3 as many KV heads as query heads (true of
# Phi-3-mini, 32/32), so a grouped Phi-3 (this test's 8/2, Phi-3-medium's 40/10) fails on its first empty
# past there (docs/consuming.md).
@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "llama32"])
def test_optimums_standard_snippet_runs_each_family(family, kind, data_dir):
    """optimum's ORTModelForCausalLM on the fused artifact of each family, its first snippet unchanged:
    greedy tokens equal our runtime's (past Mistral's window)."""
    from optimum.onnxruntime import ORTModelForCausalLM
    from transformers import AutoTokenizer

    from pipeline.consumer.runtime import Runtime

    d = str(family(kind)["fused"])
    rt = Runtime(d)
    ids = rt.encode((data_dir / "eval.txt").read_text()[:400])[:40]
    tok = AutoTokenizer.from_pretrained(d)
    out = ORTModelForCausalLM.from_pretrained(d).generate(**tok(rt.decode(ids), return_tensors="pt"),
                                                          max_new_tokens=16, do_sample=False)
    prompt = tok(rt.decode(ids))["input_ids"]
    new = out[0][len(prompt):].tolist()
    assert new and new == rt.generate(prompt, len(new))


# Mistral's window and a partial rotary (Phi-3 with partial_rotary_factor 0.5) keep ORT's kernel: the
# grouped branch reproduces neither (pipeline/graph/decode.py).
@pytest.mark.parametrize("kind,grouped", [("llama", True), ("qwen2", True), ("llama32", True), ("phi3", True),
                                          ("mistral", False), ("phi3-partial", False)])
def test_the_runtimes_grouped_decode_on_each_family(family, kind, grouped, data_dir):
    """Each family's fused graph decoded from the first position through the grouped branch (where its
    attention allows it) gives the kernel's logits and greedy tokens."""
    from pipeline.consumer.runtime import Runtime

    d = family(kind)["fused"]
    kernel, ours = Runtime(d, grouped_from=None), Runtime(d, grouped_from=1)
    assert ours.grouped_layers == (LAYERS if grouped else 0)
    ids = kernel.encode((data_dir / "eval.txt").read_text())[:80]
    a, b = kernel.decode_path_logits(ids, prefix=4), ours.decode_path_logits(ids, prefix=4)
    assert np.abs(a - b).max() < 1e-4, np.abs(a - b).max()
    assert kernel.greedy(ids[:10], 16) == ours.greedy(ids[:10], 16)
