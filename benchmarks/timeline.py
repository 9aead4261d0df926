"""A stage's memory over time, set against its log: where in a stage its peak comes.

    python benchmarks/timeline.py run --out T.json -- pipeline quantize --mode static ...
    python benchmarks/timeline.py phases T.json "SmoothQuant statistics=smoothquant stats" \
        "calibration=weight prepacking off|calibrate 1/" ... [--into RESULTS.json --stage int8-static]

``run`` samples the command's process tree with ``pipeline.ops.memory.Sampler``, the sampler
``pipeline/ops/supervise.py`` uses (anonymous and file-backed pages apart), every 0.25 s, and records
each output line with its time. ``phases`` splits the run at the first line matching each mark (a
regular expression; a phase lasts until the next one starts) and gives each phase's peak total and
what it was made of, and each kind's own peak; ``--into`` adds them to a real-shapes results file
under ``phases`` for ``benchmarks/tables.py``."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def run(cmd: list[str], out: Path, every_s: float = 0.25) -> int:
    from pipeline.ops.memory import Sampler

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    sampler = Sampler(proc.pid, every_s, series=True).start()
    lines = []
    for line in proc.stdout:
        lines.append((round(time.monotonic() - sampler.t0, 2), line.rstrip()))
        print(line, end="", flush=True)
    rc = proc.wait()
    sampler.stop()
    samples = sampler.series
    out.write_text(json.dumps({"command": cmd, "every_s": every_s, "exit": rc, "samples": samples,
                               "lines": lines}) + "\n")
    print(f"timeline: {len(samples)} samples, {len(lines)} lines, exit {rc} -> {out}")
    return rc


def phases(timeline: dict, marks: list[tuple[str, str]]) -> list[dict]:
    starts = []
    for label, pattern in marks:
        hit = next((t for t, text in timeline["lines"] if re.search(pattern, text)), None)
        if hit is None:
            raise SystemExit(f"no line of the timeline matches {pattern!r} ({label})")
        starts.append((hit, label))
    starts.sort()
    end = timeline["samples"][-1][0] + 1 if timeline["samples"] else 0
    rows = []
    for (t, label), (t_next, _) in zip(starts, starts[1:] + [(end, None)]):
        window = [s for s in timeline["samples"] if t <= s[0] < t_next]
        if not window:
            continue
        top = max(window, key=lambda s: s[1] + s[2])
        rows.append({"phase": label, "from_s": t, "to_s": round(min(t_next, end), 2),
                     "peak_gb": round((top[1] + top[2]) / 1e9, 2), "anon_at_peak_gb": round(top[1] / 1e9, 2),
                     "file_at_peak_gb": round(top[2] / 1e9, 2),
                     "max_anon_gb": round(max(s[1] for s in window) / 1e9, 2),
                     "max_file_gb": round(max(s[2] for s in window) / 1e9, 2)})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="what", required=True)
    r = sub.add_parser("run")
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("cmd", nargs=argparse.REMAINDER)
    p = sub.add_parser("phases")
    p.add_argument("timeline", type=Path)
    p.add_argument("marks", nargs="+", help="LABEL=REGEX: the phase LABEL starts at the first line matching REGEX")
    p.add_argument("--into", type=Path, help="a real-shapes results file to add the phases to")
    p.add_argument("--stage", help="with --into: the stage the timeline is of")
    args = ap.parse_args()
    if args.what == "run":
        cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
        return run(cmd, args.out)
    rows = phases(json.loads(args.timeline.read_text()), [tuple(m.split("=", 1)) for m in args.marks])
    for row in rows:
        print(f"{row['phase']}: {row['from_s']:.0f}-{row['to_s']:.0f} s, peak {row['peak_gb']:.2f} GB "
              f"({row['anon_at_peak_gb']:.2f} anon + {row['file_at_peak_gb']:.2f} file)")
    if args.into:
        doc = json.loads(args.into.read_text())
        doc.setdefault("phases", {})[args.stage] = rows
        args.into.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"wrote {args.into}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
