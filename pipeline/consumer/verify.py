"""`pipeline verify`: trust an artifact before running it.

Checks the manifest schema, every file's size and sha256, that the artifact id matches the content,
that every external-data location stays inside the artifact, and that the installed onnxruntime can
load the graph (naming the missing op/opset when it cannot). No torch, no pickle, no remote code."""

from __future__ import annotations

from pathlib import Path

from pipeline.consumer import manifest as mf
from pipeline.consumer import untrusted
from pipeline.errors import PipelineError
from pipeline.graph.onnx_io import MODEL

# The configs an artifact ships, and the keys in them whose value is a file a consumer opens:
# onnxruntime-genai's ``filename`` (the decoder, each pipeline model), transformers' ``tokenizer_file``,
# ``vocab_file``, ``merges_file`` ... (a key ending so: the class, not a list of today's names).
CONFIGS = ("genai_config.json", "config.json", "tokenizer_config.json", "generation_config.json")
PATH_SUFFIXES = ("filename", "_file")


def _graphs(graph):
    """``graph`` and every subgraph inside it (If / Loop / Scan bodies, nested), without recursion."""
    stack = [graph]
    while stack:
        g = stack.pop()
        yield g
        for node in g.node:
            for attr in node.attribute:
                if attr.HasField("g"):
                    stack.append(attr.g)
                stack.extend(attr.graphs)


def _tensors(graph):
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("sparse_tensor"):
                yield attr.sparse_tensor.values
                yield attr.sparse_tensor.indices


def external_data_locations(model_path: Path) -> list[str]:
    """Every external-data location the graph names, in the main graph and every subgraph: onnxruntime
    follows all of them, so all of them must stay inside the artifact."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    locations = set()
    for graph in _graphs(model.graph):
        for tensor in _tensors(graph):
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                locations.update(e.value for e in tensor.external_data if e.key == "location")
    return sorted(locations)


def inside(directory: Path, name: object, what: str) -> Path:
    """``directory / name`` when ``name`` is a relative path to a regular file inside ``directory``;
    else one line naming ``what`` and why it is refused."""
    if not isinstance(name, str) or not name or "\0" in name:
        raise PipelineError(f"{directory}: {what} {str(name)[:80]!r} is not a file name: refused")
    root, target = directory.resolve(), directory / name
    if Path(name).is_absolute() or not target.resolve().is_relative_to(root):
        raise PipelineError(f"{directory}: {what} {name!r} points outside the artifact: refused")
    found = untrusted.kind(target)
    if found:
        raise PipelineError(f"{directory}: {what} {name} is {found}: refused")
    return target


def check_external_data(directory: Path) -> None:
    for loc in external_data_locations(directory / MODEL):
        inside(directory, loc, f"{MODEL}'s external data")


def check_config_paths(directory: Path) -> None:
    """The files the configs an artifact ships name (genai_config.json's decoder filename, a tokenizer
    config's tokenizer_file, ...) stay inside it: onnxruntime-genai and transformers open what they say."""
    for name in CONFIGS:
        config = directory / name
        if not config.exists():
            continue
        stack = [("", untrusted.load_json(config, name))]
        while stack:
            where, node = stack.pop()
            if isinstance(node, dict):
                for key, value in node.items():
                    if isinstance(key, str) and key.endswith(PATH_SUFFIXES) and value not in (None, ""):
                        inside(directory, value, f"{name} {where}{key}")
                    else:
                        stack.append((f"{where}{key}.", value))
            elif isinstance(node, list):
                stack.extend((where, v) for v in node)


def check_loads(directory: Path) -> None:
    """Load the graph in onnxruntime; on failure name the op or opset the installed ORT lacks."""
    import onnx
    import onnxruntime as ort

    try:
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: the load check prints one line, not ORT's notes
        ort.InferenceSession(str(directory / MODEL), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        text = str(exc)
        model = onnx.load(str(directory / MODEL), load_external_data=False)
        opsets = {o.domain or "ai.onnx": o.version for o in model.opset_import}
        hint = ""
        if "opset" in text.lower() or "not registered" in text.lower() or "NOT_IMPLEMENTED" in text:
            hint = (f"; the graph uses opsets {opsets} (ops from com.microsoft are onnxruntime contrib ops); "
                    f"the artifact was built with onnxruntime "
                    f"{mf.read_manifest(directory)['versions'].get('onnxruntime')}, this one is {ort.__version__}: "
                    f"install that version or newer")
        first = text.strip().splitlines()[0][:300] if text.strip() else type(exc).__name__
        raise PipelineError(f"onnxruntime {ort.__version__} cannot load {directory}/{MODEL}: {first}{hint}") from None


def check_card(directory: Path, manifest: dict) -> None:
    """An ONNX artifact carries its model card, listed in the manifest (so hashed) and naming its id."""
    if not any(f["path"] == mf.CARD for f in manifest["files"]):
        raise PipelineError(f"{directory}: no model card ({mf.CARD}) in the manifest: every ONNX artifact carries one; "
                            f"rebuild it with this version of the pipeline")
    if f"`{manifest['artifact_id']}`" not in (directory / mf.CARD).read_text(errors="replace"):
        raise PipelineError(f"{directory}/{mf.CARD} does not name artifact {manifest['artifact_id']}: "
                            f"the card belongs to another artifact")


def verify(directory: str | Path, load: bool = True) -> dict:
    directory = Path(directory)
    manifest = mf.read_manifest(directory)
    mf.check_files(directory, manifest)
    if (directory / MODEL).is_file():
        check_card(directory, manifest)
        check_external_data(directory)
        check_config_paths(directory)
        if load:
            check_loads(directory)
    return manifest


def lineage(manifest: dict) -> str:
    chain = [f"{manifest['stage']} {manifest['artifact_id']}"]
    chain += [f"{p['stage']} {p['artifact_id']}" for p in manifest.get("lineage", [])]
    source = manifest.get("source", {}).get("model")
    if source:
        chain.append(f"source {source}")
    return " -> ".join(chain)
