"""Reading what comes from outside (an artifact someone published, a checkpoint, a params, metrics or
baseline file, a chat template's config): every read goes through here, so each way such a file can be
wrong is one PipelineError line, and none can hang a reader or exhaust its memory.

- Only regular files are opened: a FIFO would block the reader forever, a device could be endless.
- Every read has a size bound, checked on the file's size before it is read.
- Parsed JSON and YAML have a depth and a node bound: a file nested 100 000 deep (RecursionError in the
  parser, or in whatever walks it later) or a YAML alias bomb is refused, not followed.
- Text that is not UTF-8 is refused with its path.

The standard library's json and PyYAML do the parsing; what they lack (bounds, file kinds) is this
module. It imports nothing beyond them, so a consumer's install (onnxruntime, numpy) can use it."""

from __future__ import annotations

import json
import math
import stat
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError, first_line

MAX_JSON_BYTES = 64 << 20   # manifests, configs, tokenizers' JSON: the largest real one (a 256k vocab tokenizer.json) is ~11 MB
MAX_DEPTH = 64              # no config, manifest or metrics file of ours nests past 10
MAX_NODES = 5_000_000       # values in one parsed document (a 256k-vocab tokenizer.json holds ~700 000)

_KINDS = ((stat.S_ISLNK, "a symlink"), (stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
          (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def kind(path: Path) -> str | None:
    """None for a regular file; else what it is ("a FIFO", "a symlink", "missing"...), read with lstat so
    nothing is opened or followed."""
    try:
        mode = Path(path).lstat().st_mode
    except FileNotFoundError:
        return "missing"
    except OSError as exc:
        return f"unreadable ({exc.strerror})"
    if stat.S_ISREG(mode):
        return None
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def regular(path: Path, what: str) -> Path:
    """``path`` if it is a regular file (not followed through a link); else one line naming it."""
    found = kind(path)
    if found:
        raise PipelineError(f"{what} {path} is {found}: only regular files are read")
    return Path(path)


def read_bytes(path: Path, what: str, limit: int = MAX_JSON_BYTES) -> bytes:
    size = regular(path, what).stat().st_size
    if size > limit:
        raise PipelineError(f"{what} {path} has {size / 2**20:.1f} MiB, more than the {limit / 2**20:.0f} MiB such a "
                            f"file can have: refused")
    with open(path, "rb") as fh:
        return fh.read(limit + 1)[:limit]


def read_text(path: Path, what: str, limit: int = MAX_JSON_BYTES) -> str:
    data = read_bytes(path, what, limit)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PipelineError(f"{what} {path} is not UTF-8 text (byte {exc.start}): refused") from None


def bounded(obj: Any, what: str, max_depth: int = MAX_DEPTH, max_nodes: int = MAX_NODES) -> Any:
    """``obj`` (parsed JSON / YAML) if it nests at most ``max_depth`` deep and holds at most ``max_nodes``
    values, walked without recursion (a YAML alias is counted each time it is reached: an alias bomb
    exceeds the node bound instead of expanding); non-finite numbers are left to the checks that read
    them (metrics.not_finite)."""
    stack, nodes = [(obj, 1)], 0
    while stack:
        node, depth = stack.pop()
        nodes += 1
        if depth > max_depth:
            raise PipelineError(f"{what} nests deeper than {max_depth} levels: refused")
        if nodes > max_nodes:
            raise PipelineError(f"{what} holds more than {max_nodes} values: refused")
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for v in node.values())
            stack.extend((k, depth + 1) for k in node if not isinstance(k, (str, int, float, bool, type(None))))
        elif isinstance(node, (list, tuple)):
            stack.extend((v, depth + 1) for v in node)
    return obj


def parse_json(text: str, what: str) -> Any:
    try:
        return bounded(json.loads(text), what)
    except json.JSONDecodeError as exc:
        raise PipelineError(f"{what} is not valid JSON ({exc.msg}, line {exc.lineno}): refused") from None
    except RecursionError:
        raise PipelineError(f"{what} nests deeper than {MAX_DEPTH} levels: refused") from None


def load_json(path: Path, what: str, expect: type | None = dict, limit: int = MAX_JSON_BYTES) -> Any:
    """The parsed JSON file at ``path`` (``what`` names it in errors: "metrics file"), checked to be a
    ``expect`` (None: anything)."""
    data = parse_json(read_text(path, what, limit), f"{what} {path}")
    if expect is not None and not isinstance(data, expect):
        raise PipelineError(f"{what} {path} holds a JSON {type(data).__name__}, not "
                            f"{'an object' if expect is dict else 'a ' + expect.__name__}: refused")
    return data


def parse_yaml(text: str, what: str) -> Any:
    import yaml

    try:
        return bounded(yaml.safe_load(text), what)
    except yaml.YAMLError as exc:
        raise PipelineError(f"{what} is not valid YAML: {first_line(exc)}") from None
    except RecursionError:
        raise PipelineError(f"{what} nests deeper than {MAX_DEPTH} levels: refused") from None


def finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
