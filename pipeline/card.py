"""The model card (``README.md``) every ONNX artifact carries, generated from its manifest.

Hugging Face model-card conventions: YAML front-matter (``library_name``, ``base_model``,
``pipeline_tag``, tags), then what the artifact is, its figures, its quantization policy, its lineage
and three ways to run it. The card is listed and hashed in the manifest like every other file; it is
left out of the artifact id (which names the model's content, params and lineage), because its prose
and layout may change with the pipeline's version while the model does not. `verify` checks the card's hash and that
it names the manifest's artifact id. The card holds only the artifact's own figures, rounded to
digits another CPU's kernels do not move; speed depends on the machine, so the card says where it is
measured instead of quoting one machine's figure.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from .compat import optimum_head_dim_fix
from .consumer.manifest import CARD, compared_with
from .scoring.metrics import SCORED


def base_model(manifest: dict) -> str:
    """The checkpoint the lineage starts from, as a hub id where there is one."""
    source = manifest.get("source") or {}
    model = str(source.get("model", "unknown"))
    if source.get("kind") == "local":
        return Path(model).name
    return model


def _front_matter(manifest: dict, directory: Path, precision: str) -> str:
    stage = manifest["stage"]
    tags = ["onnx", "onnxruntime", stage, precision or "fp32", "kv-cache", "text-generation"]
    model_type = _config(directory).get("model_type")
    if model_type:
        tags.insert(2, model_type)
    lines = ["---", "library_name: onnxruntime", f"base_model: {json.dumps(base_model(manifest))}",
             "pipeline_tag: text-generation", "tags:"]
    lines += [f"  - {t}" for t in dict.fromkeys(tags)]
    return "\n".join(lines + ["---", ""])


def _fmt(value, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def _quality(metrics: dict) -> list[str]:
    ev = metrics.get("eval")
    if not ev:
        return ["Not scored when built (built without `--eval`): run "
                "`pipeline evaluate --artifact . --reference <export>` for PPL, drift, KLD and top-1.", ""]
    ref = "PyTorch (the checkpoint)" if ev["reference"] == "checkpoint" else f"the {ev['reference']} artifact"
    return [
        f"Scored on held-out text ({ev['tokens_scored']:,} tokens in {ev['windows']} windows of {ev['ctx']}, the "
        f"second half of each window scored, as llama.cpp's perplexity tool does) against {ref} "
        f"(`{ev['reference_id']}`):", "",
        "| " + " | ".join(m.label for m in SCORED) + " |", "|" + "---|" * len(SCORED),
        "| " + " | ".join(m.show(ev.get(m.key)) for m in SCORED) + " |", "", *_tasks(ev)]


def _tasks(ev: dict) -> list[str]:
    """Task accuracy (lm-evaluation-harness through our runtime), where the stage measured it."""
    tasks = ev.get("tasks")
    if not isinstance(tasks, dict) or not tasks:
        return []
    lines = ["Task accuracy, lm-evaluation-harness through this artifact (the reference's beside it; ± one "
             "standard error):", "", "| task | metric | this artifact | reference |", "|---|---|---|---|"]
    for name, f in tasks.items():
        err = f" ± {f['stderr']:.2%}" if isinstance(f.get("stderr"), (int, float)) else ""
        ref = f"{f['reference']:.2%}" if isinstance(f.get("reference"), (int, float)) else "—"
        lines.append(f"| `{name}` | {f.get('metric', '?')} | {f['value']:.2%}{err} | {ref} |")
    return lines + [""]


def _parity(manifest: dict) -> list[str]:
    m = manifest.get("metrics", {})
    p = m.get("parity_vs_parent", m)
    if "max_abs_logit_delta" not in p:
        return []
    vs = compared_with(manifest)
    return [f"Parity with {vs}: max |Δlogit| {p['max_abs_logit_delta']:.2e} on {p.get('greedy_prompts', '?')} fixed "
            f"prompts; greedy {p.get('greedy_tokens', '?')} tokens "
            f"{'identical' if p.get('greedy_match') else 'match for ' + _fmt(p.get('greedy_prefix_match'), '.0%')}.", ""]


def _speed() -> list[str]:
    return ["Speed depends on the machine, so it is not recorded here: `python benchmarks/bench.py` measures "
            "decode and prefill on yours against the peers (docs/benchmarks.md has this project's tables), and "
            "the build's own timings are in `metrics/build/` of the repository that built it.", ""]


def _policy(manifest: dict) -> list[str]:
    out = []
    for key in ("quant_policy", "fp16_policy"):
        policy = manifest.get(key)
        if policy:
            out += ["| setting | value |", "|---|---|"]
            out += [f"| {k} | {json.dumps(v) if not isinstance(v, str) else v} |" for k, v in policy.items()]
            out.append("")
    if not out:
        out = [f"{manifest.get('precision', 'fp32')} weights, {manifest.get('kv_dtype', 'float32')} KV cache; "
               f"nothing quantized.", ""]
    return out


def _lineage(manifest: dict) -> list[str]:
    chain = [f"`{manifest['stage']}` {manifest['artifact_id']}"]
    chain += [f"`{p['stage']}` {p['artifact_id']}" for p in manifest.get("lineage", [])]
    versions = manifest.get("versions") or {}
    tools = ", ".join(f"{k} {v}" for k, v in versions.items() if v)
    return [" ← ".join(chain) + f" ← source `{(manifest.get('source') or {}).get('model', '?')}`", "",
            f"Built with: {tools}.", ""]


def _config(directory: Path) -> dict:
    path = directory / "config.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _run(manifest: dict, has_genai: bool, config: dict) -> list[str]:
    name = manifest["stage"]
    out = [
        "**Our reference runtime** (numpy + onnxruntime + tokenizers; `pip install qwen-onnx-pipeline`):", "",
        "```bash", "pipeline verify .", 'pipeline generate --artifact . "The for statement" --max-new-tokens 64',
        "```", "",
        "**optimum** (`pip install optimum-onnx`):", "",
        "```python",
        "from optimum.onnxruntime import ORTModelForCausalLM",
        "from transformers import AutoTokenizer",
        "",
        f'tok = AutoTokenizer.from_pretrained("{name}")',
        f'model = ORTModelForCausalLM.from_pretrained("{name}")',
        *optimum_head_dim_fix(config),
        'print(tok.decode(model.generate(**tok("The for statement", return_tensors="pt"))[0]))',
        "```", "",
        "**onnxruntime-genai** (`pip install onnxruntime-genai`):", "",
    ]
    if has_genai:
        out += ["```python", "import onnxruntime_genai as og", "",
                f'model = og.Model("{name}")', "tok = og.Tokenizer(model)",
                "params = og.GeneratorParams(model)", 'params.set_search_options(max_length=64)',
                "gen = og.Generator(model, params)", 'gen.append_tokens(tok.encode("The for statement"))',
                "while not gen.is_done():", "    gen.generate_next_token()",
                "print(tok.decode(gen.get_sequence(0)))", "```", ""]
    else:
        out += ["This artifact ships no `genai_config.json`, which onnxruntime-genai needs beside the model.", ""]
    return out


def _long_prompts(directory: Path, config: dict) -> list[str]:
    """What a long prompt costs with this artifact, and the optional input that keeps the logits small."""
    import onnx

    path = directory / "model.onnx"
    if not path.is_file():
        return []
    graph = onnx.load(str(path), load_external_data=False).graph
    init = {t.name for t in graph.initializer}
    past = next((i for i in graph.input if i.name.startswith("past_key_values")), None)
    if past is None:
        return []
    itemsize = {onnx.TensorProto.FLOAT16: 2, onnx.TensorProto.FLOAT: 4}.get(past.type.tensor_type.elem_type, 4)
    heads = int(config.get("num_attention_heads") or 1)
    per_token = (2 * int(config.get("num_hidden_layers", 0)) * int(config.get("num_key_value_heads") or heads)
                 * int(config.get("head_dim") or int(config.get("hidden_size", 0)) // heads) * itemsize)
    out = ["## Long prompts", "",
           f"KV cache: {per_token / 1024:,.0f} KiB per token ({'float16' if itemsize == 2 else 'float32'}), "
           f"{per_token * 32768 / 2**30:.2f} GiB at 32k tokens; context {config.get('max_position_embeddings', '?'):,} "
           f"(`max_position_embeddings`).", ""]
    if "logits_to_keep" in init and any(i.name == "logits_to_keep" for i in graph.input):
        out += ["The graph takes an optional input `logits_to_keep` (int64 scalar; default 0 = logits at every "
                "position, as a plain decoder returns them). Feed 1 while prefilling a prompt and the lm_head runs "
                "on the last position only: without it a 32k-token prompt makes 32k × vocab float32 logits "
                f"({32768 * int(config.get('vocab_size', 0)) * 4 / 2**30:.1f} GiB here). Our runtime prefills in "
                "chunks of 512 tokens and feeds it. onnxruntime logs one warning when a session opens "
                "(\"Initializer logits_to_keep appears in graph inputs ...\"): that is what makes the input optional.",
                ""]
    return out


def render(manifest: dict, directory: Path, summary: str = "", precision: str = "") -> str:
    """The card for ``manifest`` (its ``files`` not yet holding the card) of the artifact in ``directory``."""
    stage = manifest["stage"]
    m = manifest.get("metrics", {})
    model_bytes = sum(f["size"] for f in manifest["files"] if re.fullmatch(r"model\.onnx(_data)?", f["path"]))
    parent = (manifest.get("lineage") or [{}])[0].get("stage")
    lines = [_front_matter(manifest, directory, precision),
             f"# {base_model(manifest)} — {stage} (ONNX)", "",
             f"{summary or stage}. Artifact id `{manifest['artifact_id']}`, built by qwen-onnx-pipeline "
             f"from `{base_model(manifest)}`.", "",
             "## Figures", "", *_quality(m), *_parity(manifest)]
    size = f"Model size: {model_bytes / 1e6:,.2f} MB (`model.onnx` + `model.onnx_data`)"
    ratio = (m.get("eval") or {}).get("size_ratio")
    if ratio is not None:
        size += f", {ratio:.3f}× the {m['eval']['reference']}"
    lines += [size + (f"; built from `{parent}`" if parent else "") + ".", "", *_speed(),
              "## Precision", "", *_policy(manifest), *_long_prompts(directory, _config(directory)),
              "## Lineage", "", *_lineage(manifest),
              "## How to run it", "", *_run(manifest, (directory / "genai_config.json").is_file(),
                                            _config(directory)),
              "`manifest.json` holds every figure above, the params, the tool versions and the sha256 of every file.",
              ""]
    return "\n".join(lines)


def write(directory: Path, manifest: dict, summary: str = "", precision: str = "") -> dict:
    """Write the card into ``directory``; return its manifest file entry."""
    from .consumer.manifest import sha256_file

    path = directory / CARD
    path.write_text(render(manifest, directory, summary, precision))
    path.chmod(0o644)
    return {"path": CARD, "size": path.stat().st_size, "sha256": sha256_file(path)}
