"""``pipeline <stage verb>`` from a shell or DVC runs the stage in a child process and watches it, so
that a stage the kernel kills (the OOM killer sends SIGKILL: no handler, no traceback, DVC only sees an
exit code) still ends with one line: which stage, how much memory it had and of what limit, what the
measured memory model says it needs, and that its scratch files are gone.

The parent holds no model (the standard library and :mod:`pipeline.ops.memory`, about 20 MB) and the
child raises its own ``oom_score_adj``, so the OOM killer takes the stage and not its supervisor. It
samples the stage's process tree (anonymous and file-backed pages apart) and adds the peaks to the
stage's ``--run-metrics`` file."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from pipeline import registry
from pipeline.ops import memory

# Verbs that load a model but build no stage: supervised too. Every stage's verb is, from the stage index.
MODEL_VERBS = ("evaluate",)
ENV = "PIPELINE_SUPERVISED"


def verbs() -> set[str]:
    return {e.verb for e in registry.index().values()} | set(MODEL_VERBS)


def wanted(argv: list[str]) -> bool:
    return (len(argv) > 1 and argv[1] in verbs() and not os.environ.get(ENV)
            and not {"-h", "--help"} & set(argv[2:]) and sys.platform.startswith("linux"))


def _read_reports(fd: int, into: dict) -> None:
    with os.fdopen(fd, "rb") as f:
        for line in f:
            try:
                into.update(json.loads(line))
            except ValueError:
                pass


def as_child() -> None:
    """In the supervised child: die with the supervisor (a SIGKILL sent to `pipeline` must stop the
    stage too, as it did before there was a supervisor), and end a SIGTERM (a CI timeout, `kill`, passed
    on by the supervisor) as Ctrl-C ends it: unwinding, so its scratch is removed before it exits."""
    memory.die_with_parent(int(os.environ.get(ENV) or 0) or None)
    try:  # the OOM killer takes the stage, not its watcher (raising one's own score needs no privilege;
        with open("/proc/self/oom_score_adj", "r+") as f:  # lowering the watcher's is refused here)
            now = int(f.read() or 0)
            f.seek(0)
            f.write(str(min(now + 300, 1000)))
    except (OSError, ValueError):
        pass

    def terminated(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminated)


def run(argv: list[str]) -> int:
    """Run ``pipeline argv[1:]`` in a child and return its exit status (a kill explained first)."""
    rfd, wfd = os.pipe()
    env = dict(os.environ, **{ENV: str(os.getpid()), memory.SUPERVISOR_FD: str(wfd)})
    before = memory.oom_kills()
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", *argv[1:]], env=env, pass_fds=(wfd,))
    os.close(wfd)
    reports: dict = {}
    reader = threading.Thread(target=_read_reports, args=(rfd, reports), daemon=True)
    reader.start()
    sampler = memory.Sampler(proc.pid).start()
    # Ctrl-C reaches the child too (same process group) and it ends itself cleanly; a TERM sent to
    # us alone (a CI timeout, `kill`) is passed on.
    old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
    old_term = signal.signal(signal.SIGTERM, lambda *_: proc.send_signal(signal.SIGTERM))
    try:
        code = proc.wait()
    finally:
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGTERM, old_term)
    peak = sampler.stop()
    reader.join(timeout=2)
    if code == -signal.SIGKILL:
        reports.setdefault("stage", argv[1])
        print(f"error: {killed_message(reports, sampler.last, before)}", file=sys.stderr, flush=True)
        return 137
    if code < 0:
        return 128 - code
    if code == 0 and reports.get("run_metrics"):
        _add_sampled(Path(reports["run_metrics"]), peak, sampler.every_s)
    return code


def _add_sampled(path: Path, peak: dict, every_s: float) -> None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    data["sampled_rss_mb"] = {k: round(v / 2**20, 1) for k, v in peak.items()} | {"interval_s": every_s}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


def killed_message(reports: dict, last: dict, oom_before: dict) -> str:
    """One line for a stage that SIGKILL ended, its scratch removed."""
    line = memory.killed_line(reports.get("stage") or "the stage", last, oom_before, reports.get("estimate"))
    out = reports.get("out")
    if out:
        from pipeline.ops.store import drop_stale_lock, remove_stale  # after the child's death: its lock is released

        removed = remove_stale(Path(out))
        drop_stale_lock(Path(out))
        line += f". Nothing was published to {out}" + (
            f"; the {len(removed)} scratch director{'y it left was' if len(removed) == 1 else 'ies it left were'} "
            f"removed" if removed else "")
    return line
