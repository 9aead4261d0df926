"""Artifact manifests: lineage, hashes, tool versions, metrics.

Every artifact directory carries ``manifest.json``, written last. The artifact id is a content hash
over the files, the parent's id, the stage name and the stage's params, so equal inputs give equal ids
and any changed byte gives a different one. This module imports neither torch nor transformers: a
consumer with only onnxruntime can verify an artifact.
"""

from __future__ import annotations

import hashlib
import json
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

from pipeline.consumer import untrusted
from pipeline.errors import PipelineError

SCHEMA_VERSION = 2  # 2: manifest_sha256 (integrity of the manifest itself), README.md model cards
MANIFEST = "manifest.json"
TRACKED_TOOLS = ("onnx", "onnxruntime", "optimum", "optimum-onnx", "transformers", "torch", "tokenizers",
                 "qwen-onnx-pipeline")
REQUIRED_KEYS = ("schema_version", "artifact_id", "stage", "parent_id", "source", "params", "versions",
                 "files", "metrics", "lineage", "manifest_sha256")
DIGEST = "manifest_sha256"
SIGNATURE = "model.sig"  # the publisher's signature over every file (pipeline/consumer/signing.py): outside the id
# what a reader indexes into: a field of another type is refused when the manifest is read
FIELD_TYPES = {"artifact_id": str, "stage": str, "parent_id": (str, type(None)), "source": dict, "params": dict,
               "versions": dict, "files": list, "metrics": dict, "lineage": list, "manifest_sha256": str}


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def list_files(directory: Path) -> list[dict]:
    """Every regular file under ``directory`` (manifest excluded) with size and sha256; links refused."""
    entries = []
    for path in sorted(directory.rglob("*")):
        rel = path.relative_to(directory).as_posix()
        if path.is_symlink():
            raise PipelineError(f"{directory}: {rel} is a symlink; artifacts hold regular files only")
        if path.is_dir() or rel in (MANIFEST, SIGNATURE):
            continue
        if found := untrusted.kind(path):  # a FIFO would block sha256 forever: never opened
            raise PipelineError(f"{directory}: {rel} is {found}; artifacts hold regular files only")
        entries.append({"path": rel, "size": path.stat().st_size, "sha256": sha256_file(path)})
    return entries


CARD = "README.md"  # the model card: hashed and listed, but not part of the id (see pipeline/card.py)


def compute_artifact_id(files: list[dict], parent_id: str | None, stage: str, params: dict) -> str:
    """Content hash over the files (the model card excepted), the parent's id, the stage and its params."""
    payload = _canonical({
        "files": [[f["path"], f["sha256"]] for f in sorted(files, key=lambda f: f["path"]) if f["path"] != CARD],
        "parent_id": parent_id,
        "stage": stage,
        "params": params,
    })
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def machine() -> dict:
    """The machine a figure was measured on: CPU model, cores, onnxruntime version."""
    import os

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        ort = metadata.version("onnxruntime")
    except metadata.PackageNotFoundError:
        ort = None
    return {"cpu": cpu, "cores": os.cpu_count(), "onnxruntime": ort}


def tool_versions() -> dict:
    versions = {"python": platform.python_version()}
    for name in TRACKED_TOOLS:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def compared_with(manifest: dict) -> str:
    """What an artifact's parity check compared it with: PyTorch for the export (the checkpoint's
    weights), its parent artifact's stage for everything built on it."""
    if manifest["stage"] == "export":
        return "PyTorch"
    return (manifest.get("lineage") or [{}])[0].get("stage", "parent")


def build_manifest(directory: Path, *, stage: str, params: dict, source: dict, metrics: dict,
                   parent: dict | None = None, extra: dict | None = None) -> dict:
    files = list_files(directory)
    parent_id = parent["artifact_id"] if parent else None
    lineage = []
    if parent:
        lineage = [{"artifact_id": parent["artifact_id"], "stage": parent["stage"]}] + parent.get("lineage", [])
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "artifact_id": compute_artifact_id(files, parent_id, stage, params),
        "stage": stage,
        "parent_id": parent_id,
        "lineage": lineage,
        "source": source,
        "params": params,
        "versions": tool_versions(),
        "files": files,
        "size_bytes": sum(f["size"] for f in files),
        "metrics": metrics,
    }
    manifest.update(extra or {})
    return manifest


def manifest_digest(manifest: dict) -> str:
    """sha256 over the manifest's content without this digest: any later change to any field shows."""
    as_read = json.loads(_serialize({k: v for k, v in manifest.items() if k != DIGEST}))  # the types a reader sees
    return hashlib.sha256(_canonical(as_read).encode()).hexdigest()


def _serialize(manifest: dict) -> str:
    return json.dumps(manifest, indent=2, sort_keys=False, default=str) + "\n"


def write_manifest(directory: Path, manifest: dict) -> None:
    manifest[DIGEST] = manifest_digest(manifest)
    (directory / MANIFEST).write_text(_serialize(manifest))


def read_manifest(directory: str | Path) -> dict:
    """Parse and schema-check ``manifest.json``; one clear PipelineError for each way it can be wrong."""
    directory = Path(directory)
    if not directory.is_dir():
        raise PipelineError(f"artifact directory {directory} does not exist")
    path = directory / MANIFEST
    if not path.is_file():
        raise PipelineError(f"{directory} has no {MANIFEST}: not an artifact of this pipeline (or half-written)")
    manifest = untrusted.load_json(path, "manifest")
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        how = ("an older artifact: rebuild it with this version (dvc repro), or read it with the version that built it"
               if isinstance(version, int) and version < SCHEMA_VERSION else
               "upgrade qwen-onnx-pipeline to read newer artifacts")
        raise PipelineError(f"{path} has manifest schema version {repr(version)[:40]}; this tool reads version "
                            f"{SCHEMA_VERSION} ({how})")
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise PipelineError(f"{path} is malformed: missing {', '.join(missing)}")
    for key, types in FIELD_TYPES.items():
        if not isinstance(manifest[key], types):
            raise PipelineError(f"{path} is malformed: {key} is a {type(manifest[key]).__name__}")
    if not all(isinstance(f, dict) and isinstance(f.get("path"), str) and "\0" not in f["path"]
               and isinstance(f.get("sha256"), str)
               and isinstance(f.get("size"), int) and not isinstance(f.get("size"), bool) for f in manifest["files"]):
        raise PipelineError(f"{path} is malformed: 'files' must list {{path, size, sha256}} entries")
    if not all(isinstance(p, dict) and isinstance(p.get("artifact_id"), str) and isinstance(p.get("stage"), str)
               for p in manifest["lineage"]):
        raise PipelineError(f"{path} is malformed: 'lineage' must list {{artifact_id, stage}} entries")
    return manifest


def check_files(directory: str | Path, manifest: dict) -> None:
    """Every listed file present with its size and sha256, nothing unlisted, id matching the content."""
    directory = Path(directory).resolve()
    listed = {}
    for entry in manifest["files"]:
        rel = entry["path"]
        target = (directory / rel)
        if target.is_symlink():
            raise PipelineError(f"{directory}: {rel} is a symlink; artifacts hold regular files only")
        if not target.resolve().is_relative_to(directory):
            raise PipelineError(f"{directory}: manifest lists {rel}, which points outside the artifact")
        if not target.is_file():
            raise PipelineError(f"{directory}: {rel} is listed in the manifest but missing")
        if target.stat().st_size != entry["size"]:
            raise PipelineError(f"{directory}: {rel} has {target.stat().st_size} bytes, manifest says "
                                f"{entry['size']}: the file was changed or truncated")
        if sha256_file(target) != entry["sha256"]:
            raise PipelineError(f"{directory}: {rel} does not match its sha256 in the manifest: the file was changed")
        listed[rel] = entry
    actual = list_files(directory)
    extra = sorted({f["path"] for f in actual} - listed.keys())
    if extra:
        raise PipelineError(f"{directory}: {', '.join(extra)} not listed in the manifest: unknown files in the artifact")
    expected = compute_artifact_id(manifest["files"], manifest["parent_id"], manifest["stage"], manifest["params"])
    if expected != manifest["artifact_id"]:
        raise PipelineError(f"{directory}: artifact id {manifest['artifact_id']} does not match its content "
                            f"({expected}): the manifest was edited")
    if manifest_digest(manifest) != manifest[DIGEST]:
        raise PipelineError(f"{directory}/{MANIFEST} does not match its {DIGEST}: a field (metrics, lineage, "
                            f"source, versions ...) was changed after the pipeline wrote it")
    if (directory / MANIFEST).read_text() != _serialize(manifest):
        raise PipelineError(f"{directory}/{MANIFEST} is not byte for byte as the pipeline wrote it: edited or damaged")


def expect_stage(manifest: dict, stages: tuple[str, ...], directory: Path) -> None:
    if manifest["stage"] not in stages:
        raise PipelineError(f"{directory} is a '{manifest['stage']}' artifact; this step needs one of: "
                            f"{', '.join(stages)}")
