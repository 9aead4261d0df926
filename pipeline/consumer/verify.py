"""`pipeline verify`: trust an artifact before running it.

Checks the manifest schema, every file's size and sha256, that the artifact id matches the content,
that every external-data location stays inside the artifact, and that the installed onnxruntime can
load the graph (naming the missing op/opset when it cannot). No torch, no pickle, no remote code."""

from __future__ import annotations

from pathlib import Path

from pipeline.consumer import manifest as mf
from pipeline.errors import PipelineError
from pipeline.graph.onnx_io import MODEL


def external_data_locations(model_path: Path) -> list[str]:
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    locations = []
    tensors = list(model.graph.initializer)
    for node in model.graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                tensors.append(attr.t)
    for tensor in tensors:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            for entry in tensor.external_data:
                if entry.key == "location":
                    locations.append(entry.value)
    return sorted(set(locations))


def check_external_data(directory: Path) -> None:
    root = directory.resolve()
    for loc in external_data_locations(directory / MODEL):
        target = (directory / loc)
        if Path(loc).is_absolute() or not target.resolve().is_relative_to(root):
            raise PipelineError(f"{directory}/{MODEL} refers to external data {loc!r} outside the artifact: refused")
        if target.is_symlink():
            raise PipelineError(f"{directory}: external data {loc} is a symlink: refused")
        if not target.is_file():
            raise PipelineError(f"{directory}: external data file {loc} is missing")


def check_loads(directory: Path) -> None:
    """Load the graph in onnxruntime; on failure name the op or opset the installed ORT lacks."""
    import onnx
    import onnxruntime as ort

    try:
        ort.InferenceSession(str(directory / MODEL), providers=["CPUExecutionProvider"])
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
