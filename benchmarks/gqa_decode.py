"""One decode step of attention at depth L, alone, two ways over the same KV buffers bound in place (as
the runtime binds them): ORT's CPU GroupQueryAttention, and a graph of plain ops that folds each KV
group's query heads into the rows of one matrix product (ScatterND writes the new key/value into the
bound buffer in place; FusedMatMul(transB) scores, Softmax, MatMul), so each KV head is read once per
step whatever the group size. Qwen3-0.6B's layer (16 query heads over 8 KV heads), Qwen3-4B's (32 over 8)
and 8 over 8 (no group: the floor), head_dim 128, 2 threads; each row against the read bandwidth measured
in the same process. Both ways' outputs and the buffers' new row are checked equal before timing.

    python benchmarks/gqa_decode.py --depth 16384 --out benchmarks/gqa_decode.json
"""
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto as T
from onnx import helper as h

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import read_bandwidth_gb_s  # noqa: E402

HS = 128
SHAPES = ((16, 8, "qwen3-0.6b layer"), (32, 8, "qwen3-4b layer"), (8, 8, "no group"))


def _io(nh, kvh, extra):
    ins = [h.make_tensor_value_info("q", T.FLOAT, [1, 1, nh * HS]), h.make_tensor_value_info("k", T.FLOAT, [1, 1, kvh * HS]),
           h.make_tensor_value_info("v", T.FLOAT, [1, 1, kvh * HS]),
           h.make_tensor_value_info("pk", T.FLOAT, [1, kvh, "L", HS]), h.make_tensor_value_info("pv", T.FLOAT, [1, kvh, "L", HS])]
    outs = [h.make_tensor_value_info(n, T.FLOAT, None) for n in ("o", "prk", "prv")]
    return ins + extra, outs


def _model(nodes, ins, outs):
    g = h.make_graph(nodes, "g", ins, outs)
    return h.make_model(g, opset_imports=[h.make_opsetid("", 17), h.make_opsetid("com.microsoft", 1)]).SerializeToString()


def gqa(nh, kvh):
    ins, outs = _io(nh, kvh, [h.make_tensor_value_info("sk", T.INT32, [1]), h.make_tensor_value_info("tl", T.INT32, [])])
    return _model([h.make_node("GroupQueryAttention", ["q", "k", "v", "pk", "pv", "sk", "tl"], ["o", "prk", "prv"],
                               domain="com.microsoft", num_heads=nh, kv_num_heads=kvh)], ins, outs)


def grouped(nh, kvh):
    ins, outs = _io(nh, kvh, [h.make_tensor_value_info("idx", T.INT64, [1, kvh, 1, 3]),
                              h.make_tensor_value_info("mask", T.FLOAT, [1, 1, 1, "L"])])

    def shape(name, dims):
        return h.make_node("Constant", [], [name], value=h.make_tensor(name, T.INT64, [len(dims)], dims))

    nodes = [shape("s_kv", [1, kvh, 1, HS]), shape("s_q", [1, kvh, nh // kvh, HS]), shape("s_o", [1, 1, nh * HS]),
             h.make_node("Reshape", ["k", "s_kv"], ["k4"]), h.make_node("Reshape", ["v", "s_kv"], ["v4"]),
             h.make_node("ScatterND", ["pk", "idx", "k4"], ["prk"]), h.make_node("ScatterND", ["pv", "idx", "v4"], ["prv"]),
             h.make_node("Reshape", ["q", "s_q"], ["q4"]),
             h.make_node("FusedMatMul", ["q4", "prk"], ["sc"], domain="com.microsoft", transB=1, alpha=float(HS ** -0.5)),
             h.make_node("Add", ["sc", "mask"], ["scm"]), h.make_node("Softmax", ["scm"], ["p"], axis=-1),
             h.make_node("MatMul", ["p", "prv"], ["o4"]), h.make_node("Reshape", ["o4", "s_o"], ["o"])]
    return _model(nodes, ins, outs)


def step(way, nh, kvh, L, threads, repeats=20):
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    s = ort.InferenceSession(gqa(nh, kvh) if way == "gqa" else grouped(nh, kvh), so, providers=["CPUExecutionProvider"])
    r = np.random.default_rng(1)  # the same cache and token for both ways
    pk, pv = (r.standard_normal((1, kvh, L, HS), dtype=np.float32) for _ in range(2))
    q, k, v = (r.standard_normal((1, 1, n * HS), dtype=np.float32) for n in (nh, kvh, kvh))
    feeds = ({"sk": np.array([L - 1], np.int32), "tl": np.array(L, np.int32)} if way == "gqa" else
             {"idx": np.array([[[[0, j, L - 1]] for j in range(kvh)]], np.int64), "mask": np.zeros((1, 1, 1, L), np.float32)})
    io = s.io_binding()
    for name, x in dict(q=q, k=k, v=v, **feeds).items():
        io.bind_cpu_input(name, x)
    bk, bv = ort.OrtValue.ortvalue_from_numpy(pk), ort.OrtValue.ortvalue_from_numpy(pv)
    io.bind_ortvalue_input("pk", bk)
    io.bind_ortvalue_input("pv", bv)
    io.bind_ortvalue_output("prk", bk)
    io.bind_ortvalue_output("prv", bv)
    io.bind_output("o")
    s.run_with_iobinding(io)
    out = io.copy_outputs_to_cpu()[0].copy()
    if not (np.array_equal(pk[0, :, L - 1], k.reshape(kvh, HS)) and np.array_equal(pv[0, :, L - 1], v.reshape(kvh, HS))):
        raise SystemExit(f"{way}: the new key/value did not land in the bound buffer")
    for _ in range(3):
        s.run_with_iobinding(io)
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        s.run_with_iobinding(io)
        ts.append(time.perf_counter() - t)
    return float(np.median(ts)), out, pk.nbytes * 2


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depth", type=int, default=16384)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out")
    args = ap.parse_args()
    bw = read_bandwidth_gb_s(args.threads)
    print(f"read bandwidth ({args.threads} threads): {bw} GB/s")
    rows = []
    for nh, kvh, label in SHAPES:
        outs = {}
        for way in ("gqa", "grouped"):
            sec, outs[way], kv = step(way, nh, kvh, args.depth, args.threads)
            gb_s = kv / sec / 1e9
            print(f"{way:8s} {nh:2d} query heads over {kvh} KV heads: {sec * 1e3:7.2f} ms per layer, "
                  f"{gb_s:5.1f} GB/s of KV = {gb_s / bw:.0%} of the read bound")
            rows.append({"way": way, "q_heads": nh, "kv_heads": kvh, "shape": label, "ms_per_layer": round(sec * 1e3, 3),
                         "kv_mb": round(kv / 1e6, 1), "kv_gb_s": round(gb_s, 2), "of_read_bound": round(gb_s / bw, 3)})
        diff = float(np.abs(outs["gqa"] - outs["grouped"]).max())
        if not diff < 1e-4:
            raise SystemExit(f"the grouped graph's output differs from GroupQueryAttention's by {diff}")
        rows[-1]["max_abs_diff_vs_gqa"] = diff
    if args.out:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from pipeline.consumer.manifest import machine
        with open(args.out, "w") as f:
            json.dump({"depth": args.depth, "threads": args.threads, "head_dim": HS, "read_gb_s": bw, "machine": machine(),
                       "median_of": 20, "runs": rows}, f, indent=2)
            f.write("\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
