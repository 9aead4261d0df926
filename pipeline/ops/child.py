"""Library work in a fresh interpreter: for settings a library reads once at start-up (training's CPU
code paths), or memory it does not give back (torch's exporter keeps a sharded checkpoint's weights
mapped after it returns). The child's exit frees it all, and its peak memory is reported."""

from __future__ import annotations

import os
import resource
import signal

from pipeline.errors import PipelineError
from pipeline.ops import memory


def peak_rss_mb() -> float:
    """Peak resident memory of this process. (Not RUSAGE_CHILDREN: on Linux it carries the peak of
    whatever the parent shell ran before; a stage that works in a child reports the child's itself.)"""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux reports KiB


def _child_main(target, args, conn, parent) -> None:
    memory.die_with_parent(parent)  # a stage the kernel kills takes its helper with it
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
    oom_before = memory.oom_kills()
    parent_conn, child_conn = ctx.Pipe(duplex=False)
    saved = {k: os.environ.get(k) for k in env or {}}
    os.environ.update(env or {})  # the spawned child starts with this environment
    try:
        proc = ctx.Process(target=_child_main, args=(target, args, child_conn, os.getpid()), daemon=True)
        proc.start()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    child_conn.close()
    sampler = memory.Sampler(proc.pid, every_s=0.5).start()  # what it had, should the kernel kill it
    try:
        status, payload, peak = parent_conn.recv()
    except EOFError:
        proc.join()
        sampler.stop()
        name = getattr(target, "__name__", "child")
        if proc.exitcode == -signal.SIGKILL:
            raise PipelineError(memory.killed_line(f"its {name} process", sampler.last, oom_before,
                                                  memory.last_estimate)) from None
        raise PipelineError(f"{name} process died (exit code {proc.exitcode})") from None
    finally:
        sampler.stop()
    proc.join()
    if status == "error":
        raise PipelineError(payload)
    return payload, peak


