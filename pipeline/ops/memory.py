"""What memory a stage has and needs: the machine's limit and what is free of it (cgroup v1 / v2 or
/proc/meminfo), a process tree's resident memory split into anonymous and file-backed pages, the
kernel's OOM-kill counters, and the measured memory model (``memory_model.json``, fitted by
``benchmarks/real_shapes.py --fit`` from the real-shape runs).

Standard library only: the supervisor (:mod:`pipeline.ops.supervise`) imports it before any stage code.
psutil would give the tree walk but not the cgroup v1 counters or RssAnon / RssFile, so this reads
/proc itself."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

MODEL_FILE = Path(__file__).with_name("memory_model.json")


def _cgroup_files() -> list[tuple[str, Path]]:
    """(version, directory) of this process's memory cgroup(s)."""
    found = []
    try:
        for ln in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = ln.split(":", 2)
            if controllers == "":
                found.append(("v2", Path("/sys/fs/cgroup", path.lstrip("/"))))
            elif "memory" in controllers.split(","):
                found.append(("v1", Path("/sys/fs/cgroup/memory", path.lstrip("/"))))
    except (OSError, ValueError):
        pass
    return found


def _meminfo() -> dict[str, int]:
    out = {}
    try:
        for ln in Path("/proc/meminfo").read_text().splitlines():
            key, rest = ln.split(":", 1)
            out[key] = int(rest.split()[0]) * 1024
    except (OSError, ValueError):
        pass
    return out


def _cgroup_limits() -> list[tuple[int, Path, Path]]:
    """(limit bytes, cgroup directory, its usage file) for each memory cgroup of this process that
    sets a limit (v2 memory.max, v1 memory.limit_in_bytes; "max" or v1's near-2^63 mean none)."""
    found = []
    for version, d in _cgroup_files():
        limit, usage = ((d / "memory.max", d / "memory.current") if version == "v2" else
                        (d / "memory.limit_in_bytes", d / "memory.usage_in_bytes"))
        try:
            text = limit.read_text().strip()
        except OSError:
            continue
        if text != "max" and int(text) < 1 << 60:
            found.append((int(text), d, usage))
    return found


def cgroup_limit() -> tuple[int, Path] | None:
    """(bytes, cgroup directory) of the tightest memory limit on this process's own cgroup, if any."""
    return min(((b, d) for b, d, _ in _cgroup_limits()), default=None, key=lambda x: x[0])


def memory_limit() -> tuple[int, str]:
    """(bytes, what sets it): the cgroup limit where one is set and lower, else the machine's RAM."""
    total = _meminfo().get("MemTotal", 0)
    limit = cgroup_limit()
    if limit and (not total or limit[0] < total):
        return limit[0], f"the memory cgroup limit ({limit[1]})"
    return total, "the machine's RAM"


def available_memory() -> int | None:
    """Bytes this process may still allocate: MemAvailable, or less where a cgroup caps it (limit -
    usage + its inactive file pages); None where neither can be read."""
    free = []
    if "MemAvailable" in (info := _meminfo()):
        free.append(info["MemAvailable"])
    for limit, d, usage in _cgroup_limits():
        try:
            stat = dict(ln.split() for ln in (d / "memory.stat").read_text().splitlines())
            cache = int(stat.get("total_inactive_file", stat.get("inactive_file", 0)))  # reclaimable
            free.append(max(limit - int(usage.read_text()) + cache, 0))
        except (OSError, ValueError):
            continue
    return min(free) if free else None


def oom_kills() -> dict[str, int]:
    """The kernel's OOM-kill counters that can see this process: its memory cgroup's (v1
    memory.oom_control, v2 memory.events) and the machine's (/proc/vmstat)."""
    counts = {}
    for version, d in _cgroup_files():
        f = d / ("memory.events" if version == "v2" else "memory.oom_control")
        try:
            for ln in f.read_text().splitlines():
                key, _, value = ln.partition(" ")
                if key == "oom_kill":
                    counts[f"cgroup:{d}"] = int(value)
        except (OSError, ValueError):
            pass
    try:
        for ln in Path("/proc/vmstat").read_text().splitlines():
            if ln.startswith("oom_kill "):
                counts["machine"] = int(ln.split()[1])
    except (OSError, ValueError):
        pass
    return counts


def _children(pid: int) -> list[int]:
    kids = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                kids += [int(x) for x in f.read().split()]
    except OSError:
        pass
    return kids


def tree_rss(pid: int) -> dict[str, int]:
    """Resident bytes of ``pid`` and its descendants: anon (heap, the pressure that gets a process
    killed), file (mapped files, e.g. weights the kernel can drop and read again) and shmem."""
    total = {"anon": 0, "file": 0, "shmem": 0}
    stack, seen = [pid], set()
    while stack:
        p = stack.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            with open(f"/proc/{p}/status") as f:
                for ln in f:
                    for key, name in (("RssAnon:", "anon"), ("RssFile:", "file"), ("RssShmem:", "shmem")):
                        if ln.startswith(key):
                            total[name] += int(ln.split()[1]) * 1024
        except OSError:
            continue
        stack += _children(p)
    return total


class Sampler:
    """Samples a process tree's resident memory every ``every_s`` seconds in a thread: the peak of the
    total and of each kind, and the last sample (what a killed process had). With ``series=True`` it
    also keeps every sample as ``(seconds since t0, anon, file)`` in ``series`` (benchmarks/timeline.py)."""

    def __init__(self, pid: int, every_s: float = 0.2, series: bool = False):
        self.pid, self.every_s = pid, every_s
        self.peak = {"anon": 0, "file": 0, "shmem": 0, "total": 0}
        self.last = dict(self.peak)
        self.series: list[tuple[float, int, int]] | None = [] if series else None
        self.t0 = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while True:
            now = tree_rss(self.pid)
            if now["anon"] or now["file"]:
                now["total"] = now["anon"] + now["file"] + now["shmem"]
                self.last = now
                for k, v in now.items():
                    self.peak[k] = max(self.peak[k], v)
                if self.series is not None:
                    self.series.append((round(time.monotonic() - self.t0, 2), now["anon"], now["file"]))
            if self._stop.wait(self.every_s):
                return

    def start(self) -> "Sampler":
        self._thread.start()
        return self

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        return self.peak


# ---- the measured memory model --------------------------------------------------------------

def fp32_weight_bytes(config: dict) -> dict[str, int]:
    """FP32 bytes of a Qwen3 / Llama-style decoder from its config.json: the whole model, and the
    embedding table's share (one table when tied; the lm_head is a second one when not)."""
    h, v = config["hidden_size"], config["vocab_size"]
    layers, inter = config["num_hidden_layers"], config["intermediate_size"]
    heads = config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or heads
    d = config.get("head_dim") or h // heads
    per_layer = h * heads * d + 2 * h * kv * d + heads * d * h + 3 * h * inter + 2 * h + 2 * d
    table = v * h * (1 if config.get("tie_word_embeddings", True) else 2)
    return {"total": 4 * (table + layers * per_layer + h), "table": 4 * table}


def _model() -> dict:
    try:
        return json.loads(MODEL_FILE.read_text())
    except (OSError, ValueError):
        return {}


def estimate(stage: str, config: dict) -> dict | None:
    """The measured model's peak RSS for ``stage`` on the model of ``config`` (None: not modelled):
    peak = a x layer weights + b x embedding table + c, all FP32 bytes, fitted per stage."""
    model = _model()
    fit = model.get("stages", {}).get(stage)
    if not fit:
        return None
    w = fp32_weight_bytes(config)
    need = fit["a"] * (w["total"] - w["table"]) + fit["b"] * w["table"] + fit["c"]
    return {"bytes": int(max(need, 0)), "fp32_weight_bytes": w["total"], "fit": fit,
            "source": model.get("source", str(MODEL_FILE.name))}


def gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


CHECK_ENV = "PIPELINE_MEMORY_CHECK"
last_estimate: dict | None = None  # this process's stage's, for a child of it the kernel kills


def check(stage: str, config: dict) -> dict | None:
    """Before a stage loads anything: refuse, in one line, a model the measured memory model says
    cannot fit under this machine's (or cgroup's) limit at all; warn when it does not fit what is free
    now. ``PIPELINE_MEMORY_CHECK=0`` runs it anyway (the model is a fit, see docs/reliability.md)."""
    from pipeline.errors import PipelineError
    from pipeline.log import info

    try:
        est = estimate(stage, config)
    except (KeyError, TypeError):  # not a decoder config this model knows
        est = None
    tell_supervisor(estimate=est)
    global last_estimate
    last_estimate = est
    if est is None:
        return None
    limit, what = memory_limit()
    need = est["bytes"]
    if limit and need > limit and os.environ.get(CHECK_ENV, "1") != "0":
        raise PipelineError(
            f"{stage} of this model ({gb(est['fp32_weight_bytes'])} FP32 weights) needs ~{gb(need)} by the measured "
            f"memory model (docs/reliability.md), more than {what}, {gb(limit)}: run it on a larger machine, or set "
            f"{CHECK_ENV}=0 to try anyway")
    free = available_memory()
    if free is not None and need > free:
        info(f"{stage}: warning: the measured memory model says ~{gb(need)} is needed and {gb(free)} is free now; "
             f"other processes hold the rest, and the kernel may stop this stage")
    return est


def killed_line(who: str, last: dict, oom_before: dict, est: dict | None = None) -> str:
    """One line for a process SIGKILL ended: by the OOM killer (its cgroup's or the machine's counter
    rose) or by someone, what it had resident, the limit, and what the memory model says it needs."""
    by_oom = any(oom_kills().get(k, 0) > v for k, v in oom_before.items())
    limit, what = memory_limit()
    had = (f" (last seen at {gb(last['total'])} resident: anonymous {gb(last['anon'])}, file-backed "
           f"{gb(last['file'])})" if last.get("total") else "")
    line = (f"{who} was killed by the kernel's out-of-memory killer{had}; the limit is {gb(limit)}, {what}"
            if by_oom else f"{who} was killed (SIGKILL: out of memory, or stopped by someone){had}; the limit is "
                           f"{gb(limit)}, {what}")
    if est:
        return line + (f"; the measured memory model says it needs ~{gb(est['bytes'])} for this model "
                       f"({gb(est['fp32_weight_bytes'])} FP32 weights, docs/reliability.md): run it where that much is "
                       f"free")
    return line + ": give it more memory"


def die_with_parent(parent: int | None = None) -> None:
    """SIGKILL this process when its parent dies (prctl PR_SET_PDEATHSIG): a stage's helper process
    must not outlive a stage the kernel killed. ``parent``: the pid it must still have afterwards
    (else the parent died before the call took hold, and this process ends now)."""
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        return
    if parent is not None and os.getppid() != parent:
        os._exit(137)


# ---- talking to the supervisor ----------------------------------------------------------------

SUPERVISOR_FD = "PIPELINE_SUPERVISOR_FD"


def tell_supervisor(**fields) -> None:
    """Send the supervising parent (``pipeline`` run from a shell or DVC) what it needs to explain a
    kill: the stage, its output directory, the estimate. A no-op when nobody supervises."""
    fd = os.environ.get(SUPERVISOR_FD)
    if not fd:
        return
    try:
        os.write(int(fd), (json.dumps(fields, default=str) + "\n").encode())
    except (OSError, ValueError):
        pass
