"""What the untrusted-input checks cost at a real shape (Qwen3-0.6B's sizes), measured in one run:

- calibration text that is one 200 MB line: our bounded reader (pipeline/text/reader.py) against one
  encode call over the whole line (what it did before), each in its own process, peak RSS and wall;
- signing and checking a signature (OpenSSF model-signing) over a 0.6B FP32-sized artifact (2.4 GB),
  beside the manifest's own integrity check of the same files;
- checking a recorded-outputs entry of the 0.6B shape (38 windows x 64 scored positions x 151 936 vocab,
  float32: 1.5 GB) against reading it, which the comparison does anyway.

    python benchmarks/untrusted_costs.py     # writes benchmarks/untrusted_costs.json (docs/reliability.md)
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.consumer.manifest import machine  # noqa: E402

LINE_MB = 200
ARTIFACT_BYTES = int(2.4e9)
WINDOWS, SCORED, VOCAB = 38, 64, 151_936

CHILD = r"""
import resource, sys, time
from pathlib import Path
t0 = time.perf_counter()
if sys.argv[1] == "bounded":
    from pipeline.text.reader import calibration_windows
    n = len(calibration_windows(sys.argv[2], "text", sys.argv[3], 128, 128))
else:  # one encode call over the whole line, as before
    from tokenizers import Tokenizer
    n = len(Tokenizer.from_file(sys.argv[3]).encode(Path(sys.argv[2]).read_text(), add_special_tokens=False).ids)
print(n, time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


LIMIT_GB = 12  # each reader runs under this address-space limit: the unbounded one must not take the machine


def _memory_limit() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (LIMIT_GB << 30,) * 2)


def calibration(tmp: Path, tokenizer: Path) -> list[dict]:
    line = tmp / "one_line.txt"
    with open(line, "w") as f:
        words = "the quick brown fox jumps over the lazy dog " * 1000
        while f.tell() < LINE_MB * 1e6:
            f.write(words)
    rows = []
    for how in ("bounded", "one encode call"):
        proc = subprocess.run([sys.executable, "-c", CHILD, how.split()[0], str(line), str(tokenizer)], cwd=REPO,
                              capture_output=True, text=True, preexec_fn=_memory_limit)
        if proc.returncode:
            rows.append({"reader": how, "failed": (proc.stderr.strip().splitlines() or ["killed"])[-1][:200],
                         "exit": proc.returncode})
            continue
        n, wall, rss = proc.stdout.split()[-3:]
        rows.append({"reader": how, "result": int(n), "wall_s": round(float(wall), 2), "peak_rss_mb": round(float(rss))})
    line.unlink()
    return rows


def signing(tmp: Path) -> dict:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from pipeline.consumer import manifest as mf
    from pipeline.consumer import signing as sig

    art = tmp / "artifact"
    art.mkdir()
    with open(art / "model.onnx_data", "wb") as f:
        block = os.urandom(1 << 24)
        for _ in range(ARTIFACT_BYTES // len(block)):
            f.write(block)
    (art / "model.onnx").write_bytes(b"graph")
    manifest = mf.build_manifest(art, stage="export", params={}, source={}, metrics={})
    mf.write_manifest(art, manifest)
    key = ec.generate_private_key(ec.SECP256R1())
    (tmp / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                    serialization.NoEncryption()))
    (tmp / "pub.pem").write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                                serialization.PublicFormat.SubjectPublicKeyInfo))
    out = {"artifact_gb": round(ARTIFACT_BYTES / 1e9, 2)}
    t0 = time.perf_counter()
    mf.check_files(art, mf.read_manifest(art))
    out["integrity_check_s"] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    sig.sign(art, tmp / "key.pem")
    out["sign_s"] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    sig.check_signature(art, tmp / "pub.pem")
    out["check_signature_s"] = round(time.perf_counter() - t0, 2)
    return out


def outputs_cache(tmp: Path) -> dict:
    from pipeline.scoring import outputs

    rng = np.random.default_rng(0)

    def fill(d: Path) -> dict:
        for i in range(WINDOWS):
            np.save(d / f"window_{i}.npy", rng.standard_normal((SCORED, VOCAB), dtype=np.float32))
        np.save(d / "windows.npy", np.zeros((WINDOWS, 2 * SCORED), dtype=np.int64))
        return {"windows": WINDOWS, "ctx": 2 * SCORED, "scored": SCORED, "seconds": 0.0}

    entry = tmp / "entry"
    outputs._write(entry, fill)
    t0 = time.perf_counter()
    rec = outputs.Recorded(entry)
    check = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(WINDOWS):
        rec.window_logprobs(i)
    read = time.perf_counter() - t0
    size = sum(p.stat().st_size for p in entry.iterdir())
    return {"entry_gb": round(size / 1e9, 2), "check_s": round(check, 2), "read_and_log_softmax_s": round(read, 2)}


def main() -> None:
    tokenizer = REPO / "artifacts" / "export" / "tokenizer.json"
    if not tokenizer.is_file():
        sys.exit("run `dvc repro export` first: the built-in tokenizer is read from artifacts/export")
    with tempfile.TemporaryDirectory(dir=REPO / "benchmarks") as tmp:
        tmp = Path(tmp)
        result = {"machine": machine(), "threads": "default (the tokenizer's and hashlib's own)",
                  "calibration_one_line": calibration(tmp, tokenizer), "signing": signing(tmp),
                  "outputs_cache": outputs_cache(tmp)}
    result["machine"]["measured_peak_rss_mb_of_this_script"] = round(
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    path = REPO / "benchmarks" / "untrusted_costs.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
