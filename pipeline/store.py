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
import resource
import shutil
import tempfile
import time
from pathlib import Path

from . import manifest as mf
from .errors import PipelineError


@contextlib.contextmanager
def _exclusive(out: Path):
    path = out.with_name(f".{out.name}.lock")
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
            from .log import info

            info(f"removed {len(removed)} scratch director{'y' if len(removed) == 1 else 'ies'} an interrupted run "
                 f"left beside {out}: {', '.join(sorted(removed))}")
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        # Libraries' own temp files (ORT's quantizer and calibrator, optimum) go beside the artifact too,
        # so a killed run leaves nothing in /tmp either.
        lib_tmp = Path(tempfile.mkdtemp(prefix=f"{tmp.name}-lib-", dir=out.parent))
        saved, tempfile.tempdir = tempfile.tempdir, str(lib_tmp.resolve())  # absolute: a library may chdir
        _started[tmp] = time.perf_counter()
        try:
            yield tmp
        finally:
            _started.pop(tmp, None)
            tempfile.tempdir = saved
            for scratch in (tmp, lib_tmp):
                if scratch.exists():
                    shutil.rmtree(scratch, ignore_errors=True)


_started: dict[Path, float] = {}


def peak_rss_mb() -> float:
    """Peak resident memory of this process. (Not RUSAGE_CHILDREN: on Linux it carries the peak of
    whatever the parent shell ran before; a stage that works in a child reports the child's itself.)"""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux reports KiB


def _child_main(target, args, conn) -> None:
    try:
        result = target(*args)
        conn.send(("ok", result, peak_rss_mb()))
    except PipelineError as exc:
        conn.send(("error", str(exc), peak_rss_mb()))
    except BaseException as exc:  # noqa: BLE001 - reported by the parent as one line
        first = str(exc).splitlines()[0][:300] if str(exc) else ""
        conn.send(("error", f"{getattr(target, '__name__', 'child')} failed: {type(exc).__name__}: {first}", peak_rss_mb()))


def in_child(target, *args, env: dict[str, str] | None = None):
    """Run ``target(*args)`` (a module-level function) in a fresh interpreter, with ``env`` added to its
    environment, and return (its result, its peak RSS in MiB). For library work whose settings are read
    once at start-up, or whose memory is not all given back (torch's exporter keeps a sharded
    checkpoint's weights mapped after it returns): the child's exit frees it all."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    parent_conn, child_conn = ctx.Pipe(duplex=False)
    saved = {k: os.environ.get(k) for k in env or {}}
    os.environ.update(env or {})  # the spawned child starts with this environment
    try:
        proc = ctx.Process(target=_child_main, args=(target, args, child_conn), daemon=True)
        proc.start()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    child_conn.close()
    try:
        status, payload, peak = parent_conn.recv()
    except EOFError:
        proc.join()
        raise PipelineError(f"{getattr(target, '__name__', 'child')} process died (exit code {proc.exitcode}): "
                            f"out of memory or killed") from None
    proc.join()
    if status == "error":
        raise PipelineError(payload)
    return payload, peak


def scratch_dir(tmp: Path, tag: str):
    """A scratch directory for a stage's intermediate files, beside its staging dir and named like it,
    so that it is removed with it, or by the next run if this one is killed."""
    return tempfile.TemporaryDirectory(dir=tmp.parent, prefix=f"{tmp.name}-{tag}-")


def publish(tmp: Path, out: str | Path, **manifest_fields) -> dict:
    """Write the manifest into ``tmp`` and rename it to ``out`` (replacing an old artifact)."""
    out = Path(out)
    for path in [tmp, *tmp.rglob("*")]:  # mkdtemp makes 0700; artifacts are shared read-only data
        path.chmod(0o755 if path.is_dir() else 0o644)
    if tmp in _started:  # every stage records its own wall time and peak memory
        metrics = manifest_fields.get("metrics", {})
        manifest_fields["metrics"] = {**metrics, "peak_rss_mb": max(peak_rss_mb(), metrics.get("child_peak_rss_mb", 0)),
                                      "wall_seconds": round(time.perf_counter() - _started[tmp], 2)}
    if (tmp / "model.onnx").is_file():  # onnxruntime-genai runs every ONNX artifact as shipped
        from . import genai

        genai.write(tmp)
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
