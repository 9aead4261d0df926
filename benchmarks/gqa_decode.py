"""One decode step of ORT's CPU GroupQueryAttention at depth L, alone: does it read each KV head once
per query head? Qwen3-0.6B's layer shape (16 query heads over 8 KV heads, head_dim 128) against 8 over 8
(the same cache, half the queries) and 16 over 16 (twice the cache), 2 threads, the cache bound in place
as the runtime binds it.

    python benchmarks/gqa_decode.py --depth 16384 --out benchmarks/gqa_decode.json
"""
import argparse
import json
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto as T
from onnx import helper as h


def model(nh, kvh, hs=128):
    inputs = [h.make_tensor_value_info("q", T.FLOAT, [1, 1, nh * hs]), h.make_tensor_value_info("k", T.FLOAT, [1, 1, kvh * hs]),
              h.make_tensor_value_info("v", T.FLOAT, [1, 1, kvh * hs]),
              h.make_tensor_value_info("pk", T.FLOAT, [1, kvh, "L", hs]), h.make_tensor_value_info("pv", T.FLOAT, [1, kvh, "L", hs]),
              h.make_tensor_value_info("sk", T.INT32, [1]), h.make_tensor_value_info("tl", T.INT32, [])]
    outs = [h.make_tensor_value_info("o", T.FLOAT, None), h.make_tensor_value_info("prk", T.FLOAT, None), h.make_tensor_value_info("prv", T.FLOAT, None)]
    n = h.make_node("GroupQueryAttention", ["q", "k", "v", "pk", "pv", "sk", "tl"], ["o", "prk", "prv"], domain="com.microsoft",
                    num_heads=nh, kv_num_heads=kvh)
    g = h.make_graph([n], "g", inputs, outs)
    return h.make_model(g, opset_imports=[h.make_opsetid("", 17), h.make_opsetid("com.microsoft", 1)]).SerializeToString()

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--depth", type=int, default=16384)
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--out")
args = ap.parse_args()
L = args.depth
so = ort.SessionOptions(); so.intra_op_num_threads = args.threads
rng = np.random.default_rng(0)
rows = []
for nh, kvh in ((16, 8), (8, 8), (16, 16)):
    s = ort.InferenceSession(model(nh, kvh), so, providers=["CPUExecutionProvider"])
    pk = rng.standard_normal((1, kvh, L, 128), dtype=np.float32); pv = rng.standard_normal((1, kvh, L, 128), dtype=np.float32)
    io = s.io_binding()
    feeds = {"q": rng.standard_normal((1, 1, nh * 128), dtype=np.float32), "k": rng.standard_normal((1, 1, kvh * 128), dtype=np.float32),
             "v": rng.standard_normal((1, 1, kvh * 128), dtype=np.float32), "sk": np.array([L - 1], np.int32), "tl": np.array(L, np.int32)}
    for k, x in feeds.items(): io.bind_cpu_input(k, x)
    ov_k = ort.OrtValue.ortvalue_from_numpy(pk); ov_v = ort.OrtValue.ortvalue_from_numpy(pv)
    io.bind_ortvalue_input("pk", ov_k); io.bind_ortvalue_input("pv", ov_v)
    io.bind_ortvalue_output("prk", ov_k); io.bind_ortvalue_output("prv", ov_v); io.bind_output("o")
    for _ in range(3): s.run_with_iobinding(io)
    ts = []
    for _ in range(20):
        t = time.perf_counter(); s.run_with_iobinding(io); ts.append(time.perf_counter() - t)
    ms = np.median(ts) * 1e3; kv = pk.nbytes * 2
    print(f"q heads {nh:2d}, kv heads {kvh:2d}: {ms:6.2f} ms per layer, KV {kv / 1e6:.0f} MB -> {kv / (ms / 1e3) / 1e9:.1f} GB/s of KV")
    rows.append({"q_heads": nh, "kv_heads": kvh, "ms_per_layer": round(ms, 3), "kv_mb": round(kv / 1e6, 1),
                 "kv_gb_s": round(kv / (ms / 1e3) / 1e9, 2)})
if args.out:
    from pipeline.consumer.manifest import machine
    with open(args.out, "w") as f:
        json.dump({"depth": L, "threads": args.threads, "head_dim": 128, "machine": machine(), "median_of": 20,
                   "runs": rows}, f, indent=2)
        f.write("\n")
    print(f"wrote {args.out}")
