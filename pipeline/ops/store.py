"""Atomic artifact directories: build in a temp dir beside the destination, write the manifest last,
then rename. A failed or interrupted stage never leaves a half-written artifact behind.

One run at a time writes a destination: ``.<name>.lock`` beside it is held with ``flock`` for the whole
stage (the kernel drops it when the process dies, even on SIGKILL, and the next run reuses the file),
and a second run is refused. Every
scratch directory of a stage is named ``.<name>.tmp-*`` beside the destination, so a run killed before
its clean-up leaves nothing the next run of that stage does not remove: under the lock, any such
directory belongs to a run that is gone."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from pathlib import Path

from pipeline.consumer import manifest as mf
from pipeline.errors import PipelineError


def lock_path(out: Path) -> Path:
    return out.with_name(f".{out.name}.lock")


def drop_stale_lock(out: Path) -> None:
    """A dead run's lock file beside ``out`` (the kernel released its flock), unless a run holds it now."""
    path = lock_path(out)
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        path.unlink(missing_ok=True)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def _exclusive(out: Path):
    path = lock_path(out)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise PipelineError(f"another pipeline run (pid {holder}) is writing {out}; wait for it to finish "
                                f"(or stop it) and run again") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        try:
            yield
        finally:
            path.unlink(missing_ok=True)  # still held: nobody else can be inside; a killed run leaves the file
    finally:
        os.close(fd)  # releases the lock


def remove_stale(out: Path) -> list[str]:
    """Scratch and half-renamed directories a killed run of this stage left beside ``out``."""
    removed = []
    for pattern in (f".{out.name}.tmp-*", f".{out.name}.old-*"):
        for stale in out.parent.glob(pattern):
            shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
            removed.append(stale.name)
    return removed


@contextlib.contextmanager
def staging_dir(out: str | Path):
    """Yield an empty temp dir; on success the caller's :func:`publish` moves it to ``out``."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(out):
        removed = remove_stale(out)
        if removed:
            from pipeline.log import info

            info(f"removed {len(removed)} scratch director{'y' if len(removed) == 1 else 'ies'} an interrupted run "
                 f"left beside {out}: {', '.join(sorted(removed))}")
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        # Libraries' own temp files (ORT's quantizer and calibrator, optimum) go beside the artifact too,
        # so a killed run leaves nothing in /tmp either.
        lib_tmp = Path(tempfile.mkdtemp(prefix=f"{tmp.name}-lib-", dir=out.parent))
        saved, tempfile.tempdir = tempfile.tempdir, str(lib_tmp.resolve())  # absolute: a library may chdir
        try:
            yield tmp
        finally:
            tempfile.tempdir = saved
            for scratch in (tmp, lib_tmp):
                if scratch.exists():
                    shutil.rmtree(scratch, ignore_errors=True)


def scratch_dir(tmp: Path, tag: str):
    """A scratch directory for a stage's intermediate files, beside its staging dir and named like it,
    so that it is removed with it, or by the next run if this one is killed."""
    return tempfile.TemporaryDirectory(dir=tmp.parent, prefix=f"{tmp.name}-{tag}-")


def publish(tmp: Path, out: str | Path, manifest: dict) -> dict:
    """Write ``manifest`` (built by the runner over ``tmp``'s files) into ``tmp`` and rename it to
    ``out``, replacing an old artifact."""
    out = Path(out)
    for path in [tmp, *tmp.rglob("*")]:  # mkdtemp makes 0700; artifacts are shared read-only data
        path.chmod(0o755 if path.is_dir() else 0o644)
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
