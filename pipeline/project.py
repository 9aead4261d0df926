"""The git / DVC project the pipeline runs in: every git and dvc subprocess call of ours goes through
here (tune's queue, the gate's baselines, the report's freshness check, the benchmarks' commit), each
with one clear error and a bounded wait."""

from __future__ import annotations

import subprocess
from pathlib import Path

from .errors import PipelineError

DVC_TIMEOUT_S = 600  # no DVC call of ours takes minutes on a working queue; one that does is stuck


def dvc(*args: str, cwd: str | Path, env: dict | None = None, check: bool = True,
        timeout: float | None = DVC_TIMEOUT_S) -> subprocess.CompletedProcess:
    """``timeout`` None: a build (``dvc repro``) that takes as long as it takes."""
    try:
        proc = subprocess.run(["dvc", *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise PipelineError(f"dvc {' '.join(args[:3])} did not answer in {timeout:.0f} s (a DVC lock held by a "
                            f"stuck queue worker? `dvc queue status`, `dvc queue stop --kill`)") from None
    if check and proc.returncode != 0:
        last = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
        raise PipelineError(f"dvc {' '.join(args[:3])} failed: {last[-1] if last else proc.returncode}")
    return proc


def dvc_detached(*args: str, cwd: str | Path, env: dict | None = None) -> int:
    """A dvc call whose children outlive it (``dvc queue start``): they keep the descriptors they are
    given until they leave, so they get none of our pipes."""
    try:
        return subprocess.run(["dvc", *args], cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              timeout=DVC_TIMEOUT_S).returncode
    except subprocess.TimeoutExpired:
        raise PipelineError(f"dvc {' '.join(args[:3])} did not answer in {DVC_TIMEOUT_S} s (`dvc queue status`)") from None


def git(*args: str, cwd: str | Path) -> str:
    proc = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise PipelineError(f"git {' '.join(args)} failed: {proc.stderr.strip().splitlines()[-1:]}")
    return proc.stdout


def head_commit(cwd: str | Path = ".", short: bool = False) -> str:
    """HEAD's sha, or "" outside a git checkout (results files record it, where there is one)."""
    proc = subprocess.run(["git", "rev-parse", *(["--short"] if short else []), "HEAD"], cwd=cwd,
                          capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else ""


def unchanged_since(commit: str, paths, cwd: str | Path = ".") -> bool:
    """Are ``paths`` the same at HEAD as at ``commit``?"""
    return subprocess.run(["git", "diff", "--quiet", commit, "HEAD", "--", *paths], cwd=cwd,
                          capture_output=True).returncode == 0


def read_at(spec: str, cwd: str | Path = ".") -> tuple[str, str]:
    """``PATH`` or ``PATH@REV`` (a git revision: a tag, a commit) -> (the file's text, where it was read)."""
    path, _, rev = spec.partition("@")
    if rev:
        proc = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=cwd, capture_output=True, text=True, timeout=60)
        if proc.returncode != 0:
            raise PipelineError(f"{spec}: git has no {path} at {rev} ({proc.stderr.strip().splitlines()[-1:]})")
        return proc.stdout, spec
    from .consumer import untrusted

    if not Path(path).exists():
        raise PipelineError(f"{spec}: no such file (PATH or PATH@REV, a git revision)")
    return untrusted.read_text(Path(path), "the lock file"), spec


def locked_hash(lock_text: str, where: str, stage: str) -> tuple[str, str]:
    """(the md5 a dvc.lock pins for the output ``.../<stage>``, that output's path): what `dvc repro` built."""
    from .consumer import untrusted

    lock = untrusted.parse_yaml(lock_text, where)
    stages = lock.get("stages") if isinstance(lock, dict) else None
    if not isinstance(stages, dict):
        raise PipelineError(f"{where} is not a dvc.lock (no stages)")
    for entry in stages.values():
        for out in (entry.get("outs") or []) if isinstance(entry, dict) else []:
            if isinstance(out, dict) and str(out.get("path", "")).rstrip("/").split("/")[-1] == stage:
                md5 = out.get("md5")
                if isinstance(md5, str):
                    return md5, out["path"]
    raise PipelineError(f"{where} pins no output named {stage!r} (an artifact of another project?)")


def dvc_dir_md5(directory: str | Path, skip: tuple[str, ...] = ()) -> str:
    """The md5 DVC gives ``directory`` (its .dir hash: dvc_data's own tree of per-file md5s), leaving out
    ``skip`` (a signature added after the build)."""
    from dvc_data.hashfile.hash import file_md5
    from dvc_data.hashfile.hash_info import HashInfo
    from dvc_data.hashfile.meta import Meta
    from dvc_data.hashfile.tree import Tree

    directory = Path(directory)
    tree = Tree()
    for p in sorted(directory.rglob("*")):
        rel = p.relative_to(directory)
        if p.is_file() and rel.as_posix() not in skip:
            tree.add(rel.parts, Meta(size=p.stat().st_size), HashInfo("md5", file_md5(str(p))))
    tree.digest()
    return tree.hash_info.value
