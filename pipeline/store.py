"""Atomic artifact directories: build in a temp dir beside the destination, write the manifest last,
then rename. A failed or interrupted stage never leaves a half-written artifact behind."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path

from . import manifest as mf


@contextlib.contextmanager
def staging_dir(out: str | Path):
    """Yield an empty temp dir; on success the caller's :func:`publish` moves it to ``out``."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def publish(tmp: Path, out: str | Path, **manifest_fields) -> dict:
    """Write the manifest into ``tmp`` and rename it to ``out`` (replacing an old artifact)."""
    out = Path(out)
    for path in [tmp, *tmp.rglob("*")]:  # mkdtemp makes 0700; artifacts are shared read-only data
        path.chmod(0o755 if path.is_dir() else 0o644)
    manifest = mf.build_manifest(tmp, **manifest_fields)
    if (tmp / "model.onnx").is_file():  # every ONNX artifact explains itself: README.md, a model card
        from . import card

        manifest["files"] = sorted([*manifest["files"], card.write(tmp, manifest)], key=lambda f: f["path"])
        manifest["size_bytes"] = sum(f["size"] for f in manifest["files"])
    mf.write_manifest(tmp, manifest)
    old = None
    if out.exists() or out.is_symlink():
        old = out.with_name(f".{out.name}.old-{manifest['artifact_id']}")
        if old.exists():
            shutil.rmtree(old)
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
    return manifest
