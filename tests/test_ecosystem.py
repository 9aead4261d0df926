"""Artifacts as the ecosystem's tools take them: optimum's standard snippet, chat templates, model cards,
and a report that never draws throughput from other code beside drift measured now."""

import json
import shutil
import subprocess

import pytest
import yaml

from pipeline import card as model_card
from pipeline import registry
from pipeline import report as r
from pipeline.consumer import chat
from pipeline.consumer import manifest as mf
from pipeline.consumer.runtime import Runtime
from pipeline.registry import ONNX as ARTIFACTS
from tests.conftest import REPO, assert_clean_failure, build, genai_greedy, run_cli, scoring
from tests.test_verify import rehash


@pytest.fixture
def artifact(derived, export_dir):
    return lambda name: export_dir if name == "export" else derived(name)


def _prompt(data_dir) -> str:
    """A held-out sentence: the small test model continues it with varied tokens."""
    return (data_dir / "eval.txt").read_text()[:160].rsplit(" ", 1)[0]


def test_tokenizer_declares_a_qwen3_tokenizers_inputs(export_dir):
    from transformers import AutoTokenizer

    cfg = json.loads((export_dir / "tokenizer_config.json").read_text())
    assert cfg["model_input_names"] == ["input_ids", "attention_mask"]
    assert cfg["bos_token"] is None and cfg["eos_token"] == "<|endoftext|>"
    assert set(AutoTokenizer.from_pretrained(str(export_dir))("def f():", return_tensors="np")) == {
        "input_ids", "attention_mask"}


@pytest.mark.parametrize("name", ARTIFACTS)
def test_optimum_standard_snippet_matches_our_runtime(artifact, data_dir, name):
    """The first snippet a user copies, unchanged, on every artifact; greedy tokens equal our runtime's."""
    from optimum.onnxruntime import ORTModelForCausalLM
    from transformers import AutoTokenizer

    d = str(artifact(name))
    text = _prompt(data_dir)
    tok = AutoTokenizer.from_pretrained(d)
    out = ORTModelForCausalLM.from_pretrained(d).generate(**tok(text, return_tensors="pt"))
    rt = Runtime(d)
    ids = rt.encode(text)
    assert out[0][: len(ids)].tolist() == ids
    new = out[0][len(ids):].tolist()
    assert new, "optimum generated nothing"
    assert new == rt.generate(ids, len(new))


@pytest.mark.parametrize("name", ARTIFACTS)
def test_onnxruntime_genai_runs_every_artifact_as_shipped(artifact, data_dir, name):
    """onnxruntime-genai's own runtime, reading only the artifact's genai_config.json: same greedy tokens."""
    import onnxruntime_genai as og

    d = artifact(name)
    rt = Runtime(d)
    cfg = json.loads((d / "genai_config.json").read_text())
    assert cfg["search"]["past_present_share_buffer"] is rt.io.right_padded  # shared only under GQA
    model = og.Model(str(d))
    ids = rt.encode(_prompt(data_dir))
    assert list(og.Tokenizer(model).encode(_prompt(data_dir))) == ids
    new = genai_greedy(d, ids, 24)
    assert new, "onnxruntime-genai generated nothing"
    assert new == rt.generate(ids, len(new))


def _genai_rows(model, prompts: list[str], longest: int, new: int) -> list[list[int]]:
    """onnxruntime-genai's batched greedy decode (it pads on the right): each row's new tokens."""
    import onnxruntime_genai as og

    options = og.GeneratorParams(model)
    options.set_search_options(max_length=longest + new, do_sample=False, batch_size=len(prompts))
    gen = og.Generator(model, options)
    gen.append_tokens(og.Tokenizer(model).encode_batch(prompts))
    out: list[list[int]] = [[] for _ in prompts]
    for _ in range(new):
        if gen.is_done():
            break
        gen.generate_next_token()
        for i, t in enumerate(gen.get_next_tokens()):
            out[i].append(int(t))
    return out


def _until_eos(tokens: list[int], eos: set[int]) -> list[int]:
    return tokens[: next((i + 1 for i, t in enumerate(tokens) if t in eos), len(tokens))]


@pytest.mark.parametrize("name", ARTIFACTS)
def test_batches_under_optimum_and_genai_give_each_row_its_own_tokens_or_refuse(artifact, data_dir, name):
    """A mixed-length batch the way each consumer pads it: onnxruntime-genai on the right, optimum's
    ``generate`` on the left (transformers' advice for decoder-only models). Each row gets the tokens it
    gets alone; on graphs with GroupQueryAttention (everything but the export) a left-padded batch fails
    in one error that says why, instead of giving the short row wrong tokens silently."""
    import onnxruntime_genai as og
    from optimum.onnxruntime import ORTModelForCausalLM
    from transformers import AutoTokenizer

    from pipeline.graph.fusions import LEFT_PADDING_REFUSED


    d = artifact(name)
    rt = Runtime(d)
    text = _prompt(data_dir)
    prompts = [text, text[:30].rsplit(" ", 1)[0]]
    rows = [rt.encode(p) for p in prompts]
    assert len(rows[0]) > len(rows[1]) + 3
    model = og.Model(str(d))
    longest = max(map(len, rows))
    alone = [_genai_rows(model, [p], longest, 12)[0] for p in prompts]
    batched = _genai_rows(model, prompts, longest, 12)
    for a, b in zip(alone, batched):
        assert _until_eos(b, rt.eos_ids) == _until_eos(a, rt.eos_ids)
    assert rt.generate_batch(rows, 12, stop_at_eos=False) == [rt.generate(r, 12, stop_at_eos=False) for r in rows]

    tok = AutoTokenizer.from_pretrained(str(d))
    tok.pad_token = tok.pad_token or tok.eos_token
    tok.padding_side = "left"
    hf = ORTModelForCausalLM.from_pretrained(str(d))
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    solo = [hf.generate(**tok(p, return_tensors="pt"), **kw)[0, len(r):].tolist() for p, r in zip(prompts, rows)]
    batch = tok(prompts, return_tensors="pt", padding=True)
    if rt.io.right_padded:
        with pytest.raises(Exception) as err:
            hf.generate(**batch, **kw)
        assert LEFT_PADDING_REFUSED in str(err.value)
    else:
        out = hf.generate(**batch, **kw)[:, batch["input_ids"].shape[1]:].tolist()
        for a, b in zip(solo, out):
            assert _until_eos(b, rt.eos_ids) == _until_eos(a, rt.eos_ids)


TEMPLATE_WITH_HELPERS = (
    "{%- if messages[0]['role'] != 'system' %}{{ raise_exception('system first') }}{% endif %}"
    "{%- for m in messages %}{%- if loop.index0 > 5 %}{% break %}{% endif %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}{% if m.tool %} {{ m.tool | tojson }}{% endif %}<|im_end|>\n"
    "{%- endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}{{ eos_token }}")


@pytest.mark.parametrize("which", ["shipped", "helpers"])
def test_chat_rendering_equals_transformers(export_dir, tmp_path, which):
    from transformers import AutoTokenizer

    d = export_dir
    if which == "helpers":
        d = tmp_path / "tok"
        shutil.copytree(export_dir, d)
        (d / "chat_template.jinja").write_text(TEMPLATE_WITH_HELPERS)
    messages = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Ünïcode & <tags>"},
                {"role": "assistant", "content": "ok", "tool": {"name": "f", "args": [1, "é"]}},
                {"role": "user", "content": "again"}]
    tok = AutoTokenizer.from_pretrained(str(d))
    for add in (True, False):
        ours = chat.render(d, messages, add_generation_prompt=add)
        assert ours == tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add)
    assert "<|im_start|>assistant\n" in chat.render(d, messages)
    with pytest.raises(Exception, match="system first"):
        chat.render(d, messages[1:]) if which == "helpers" else (_ for _ in ()).throw(Exception("system first"))


def test_generate_chat_applies_the_template(export_dir):
    proc = run_cli("generate", "--artifact", str(export_dir), "--chat", "--system", "Be brief.", "What is a list?",
                   "--max-new-tokens", "8", check=True)
    assert "<|im_start|>" not in proc.stdout and "What is a list?" not in proc.stdout
    assert "generate:" in proc.stderr
    assert_clean_failure(run_cli("generate", "--artifact", str(export_dir), "--system", "x", "hi"), "--chat")


def _republish(src, dst, drop: str):
    """A valid artifact like ``src`` without the file ``drop`` (as a tool that ships no template makes)."""
    from pipeline.ops import store

    m = mf.read_manifest(src)
    with store.staging_dir(dst) as tmp:
        for f in m["files"]:
            if f["path"] not in (drop, mf.CARD):
                shutil.copy2(src / f["path"], tmp / f["path"])
        new = mf.build_manifest(tmp, stage=m["stage"], params=m["params"], source=m["source"], metrics=m["metrics"],
                                parent={"artifact_id": m["parent_id"], "stage": m["lineage"][0]["stage"],
                                        "lineage": m["lineage"][1:]})
        new["files"] = sorted([*new["files"], model_card.write(tmp, new)], key=lambda f: f["path"])
        store.publish(tmp, dst, new)


def test_generate_chat_without_a_template_is_refused(export_dir, tmp_path):
    d = tmp_path / "plain"
    _republish(export_dir, d, "chat_template.jinja")
    run_cli("verify", str(d), check=True)
    assert_clean_failure(run_cli("generate", "--artifact", str(d), "--chat", "hi"), "no chat template")


@pytest.mark.parametrize("name", ARTIFACTS)
def test_every_artifact_carries_a_model_card(artifact, name):
    d = artifact(name)
    m = mf.read_manifest(d)
    entry = next(f for f in m["files"] if f["path"] == "README.md")
    assert entry["sha256"] == mf.sha256_file(d / "README.md")
    text = (d / "README.md").read_text()
    front = yaml.safe_load(text.split("---\n")[1])
    assert front["library_name"] == "onnxruntime" and front["pipeline_tag"] == "text-generation"
    assert front["base_model"] == m["source"]["model"]
    precision = registry.load(name).precision
    assert precision in ("fp32", "fp16", "int8", "int4") and {"onnx", name, precision} <= set(front["tags"])
    assert f"`{m['artifact_id']}`" in text and "ORTModelForCausalLM" in text and "pipeline generate" in text
    # speed is the machine's, not the artifact's: the card says where it is measured and quotes no figure
    assert "tok/s" not in text and "benchmarks/bench.py" in text and "decode" not in m["metrics"]
    for p in m.get("lineage", []):
        assert p["artifact_id"] in text


def test_card_with_build_time_scores(export_dir, tmp_path, data_dir, params, derived):
    """Built with --eval, the card carries PPL, drift, KLD and top-1, and `pipeline evaluate` reuses them."""
    fused = tmp_path / "fused"
    build("fused", params, export_dir, fused)  # the same artifact as the session's: the imatrix applies to it
    m = build("int4", params, fused, tmp_path / "int4", scoring(params, data_dir, export_dir),
              {"imatrix": derived("imatrix")})
    rec = m["metrics"]["eval"]
    text = (tmp_path / "int4" / "README.md").read_text()
    for figure in (f"{rec['ppl']:.4f}", f"{rec['drift_pct']:+.4f} %", f"{rec['kld_mean']:.2e}",
                   f"{rec['top1_agreement']:.2%}", export_dir.name):
        assert figure in text, figure
    args = ["evaluate", "--artifact", str(tmp_path / "int4"), "--reference", str(export_dir), "--data", str(data_dir),
            "-S", f"eval.max_windows={params.eval.max_windows}", "--out"]
    reused = run_cli(*args, str(tmp_path / "a.json"), check=True)
    assert "recorded when the stage built it" in reused.stderr
    fresh = run_cli(*args, str(tmp_path / "b.json"), "--rescore", check=True)
    assert "recorded when the stage built it" not in fresh.stderr
    assert "evaluate int4 " in fresh.stderr  # the artifact ran (the reference's recorded outputs are reused)
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("a.json", "b.json"))
    for key in ("ppl", "ref_ppl", "drift_pct", "kld_mean", "top1_agreement", "tokens_scored"):
        assert a[key] == pytest.approx(b[key], rel=1e-9), key


def test_verify_checks_the_card(artifact, tmp_path):
    d = tmp_path / "int4"
    shutil.copytree(artifact("int4"), d)
    (d / "README.md").write_text((d / "README.md").read_text() + "\nPPL 1.0, drift 0 %.\n")
    assert_clean_failure(run_cli("verify", str(d)), "README.md", "changed")
    shutil.copy(artifact("int8-dynamic") / "README.md", d / "README.md")  # another artifact's card, rehashed
    rehash(d, card=False)
    assert_clean_failure(run_cli("verify", str(d)), "README.md", "another artifact")
    (d / "README.md").unlink()
    rehash(d, card=False)
    assert_clean_failure(run_cli("verify", str(d)), "no model card")


def test_report_never_draws_throughput_from_other_code(tmp_path):
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    doc = {"machine": {"cpu": "Test CPU", "cores": 2}, "artifacts": {"int4": {"decode_tok_s": 1.0}}}
    assert r.bench_for_plot(doc, cwd=REPO)[0] is None  # no commit named
    data, label = r.bench_for_plot({**doc, "commit": head}, cwd=REPO)
    assert data == doc["artifacts"] and "Test CPU" in label and head[:8] in label
    root = subprocess.run(["git", "rev-list", "--max-parents=0", "HEAD"], cwd=REPO, capture_output=True,
                          text=True).stdout.split()[0]
    data, label = r.bench_for_plot({**doc, "commit": root}, cwd=REPO)
    assert data is None and "left out" in label and root[:8] in label
