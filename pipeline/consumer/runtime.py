"""The reference runtime: one piece used by evaluation, calibration and generation alike.

It loads an artifact directory, discovers input/output names, dtypes and KV-cache shapes from the
graph (FP32 or FP16 KV), and runs prefill then decode with the KV cache. :meth:`GraphIO.feeds` is
the only place that builds the merged decoder's inputs (ids, attention mask, position ids, past).
Graphs with GroupQueryAttention decode through IO binding into KV buffers allocated once and shared
by past and present (:class:`SharedKV`); other graphs concatenate their KV cache.
No torch, no transformers: onnxruntime, numpy and tokenizers only.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from pipeline.errors import PipelineError
from pipeline.log import info
from pipeline.ops.memory import available_memory

ONNX_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
               "tensor(int32)": np.int32, "tensor(int8)": np.int8, "tensor(bfloat16)": None}
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
PAST_NAME = re.compile(r"past_key_values\.(\d+)\.(key|value)$")
LOGITS_TO_KEEP = "logits_to_keep"  # the fused graph's optional input (pipeline/graph/fusions.py): lm_head on the last N
# Prompt tokens per prefill step: activations and the attention workspace are bounded by the chunk, not
# the prompt. 512: measured at the 0.6B shape (docs/long-context.md), as fast as one pass at 1k-4k.
DEFAULT_PREFILL_CHUNK = 512
# Cap on ORT's CPU GroupQueryAttention workspace (float32 scores of chunk x KV-buffer length per head):
# the chunk shrinks at long contexts so that it stays under this.
ATTENTION_WORKSPACE_BYTES = 512 << 20
# The depth (positions) from which a CPU decode step reads each KV group once instead of through ORT's
# GroupQueryAttention kernel (pipeline/graph/decode.py); below it the kernel's one op costs less than the
# grouped branch's dozen (docs/long-context.md has the measurement that chose it).
GROUPED_DECODE_FROM = 1024


def model_path(artifact_dir: str | Path) -> Path:
    path = Path(artifact_dir) / "model.onnx"
    if not path.is_file():
        raise PipelineError(f"{artifact_dir} has no model.onnx: not an ONNX artifact")
    return path


def attention_shape(config: dict) -> tuple[int, int, int]:
    """(heads, kv_heads, head_dim) of an HF config; head_dim is explicit in Qwen3 (128 where
    hidden_size / heads is 64 or 80), derived only where the config leaves it out."""
    heads = int(config["num_attention_heads"])
    return (heads, int(config.get("num_key_value_heads") or heads),
            int(config.get("head_dim") or config["hidden_size"] // heads))


def uses_gqa(model) -> bool:
    """Does the graph (an ONNX ModelProto, weights not needed) run GroupQueryAttention?"""
    return any(n.op_type == "GroupQueryAttention" for n in model.graph.node)


def load_tokenizer(artifact_dir: str | Path):
    """The artifact's ``tokenizer.json`` (tokenizers, no transformers)."""
    from tokenizers import Tokenizer

    path = Path(artifact_dir) / "tokenizer.json"
    if not path.is_file():
        raise PipelineError(f"{artifact_dir} has no tokenizer.json")
    return Tokenizer.from_file(str(path))


# ORT packs every constant MatMul weight into its GEMM layout when a session starts: a second copy of the
# weights in anonymous memory (the originals are memory-mapped), a slower start and faster windows
# (docs/real-shapes.md, "sessions"). Off where that copy would not leave room: weights over this fraction
# of the memory available. The weights are then read in place from the mapped file, pages the kernel
# can drop instead of heap.
PREPACK_MAX_FRACTION = 0.5


def model_file_bytes(path: str | Path) -> int:
    """The model file and the external data beside it."""
    path = Path(path)
    return sum(f.stat().st_size for f in path.parent.iterdir() if f.is_file() and f.name.startswith(path.name))


def prepack_fits(path: str | Path) -> bool:
    free, size = available_memory(), model_file_bytes(path)
    if free is None or size <= PREPACK_MAX_FRACTION * free:
        return True
    info(f"onnxruntime: weight prepacking off for {Path(path).parent.name} ({size / 1e9:.1f} GB of weights, "
         f"{free / 1e9:.1f} GB available): the weights are read in place from the mapped file")
    return False


def session_options(threads: int | None = None, prepack: bool = True, arena: bool = True):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads or os.cpu_count() or 1
    so.log_severity_level = 3
    so.enable_cpu_mem_arena = arena
    if not prepack:
        so.add_session_config_entry("session.disable_prepacking", "1")
    return so


def make_session(path: str | Path, provider: str = "cpu", threads: int | None = None, prepack: bool | None = None,
                 arena: bool = True, model=None):
    """An ORT session over ``path``; ``prepack`` None: ORT's weight prepacking where it fits in memory
    (:func:`prepack_fits`); ``arena`` False: no CPU memory arena (see :class:`Runtime`). ``model``: a
    rewritten ModelProto of that file (weights left external) to run instead, its weights read from
    beside ``path``."""
    import onnxruntime as ort

    if provider not in PROVIDERS:
        raise PipelineError(f"unknown provider {provider!r}: use one of {', '.join(PROVIDERS)}")
    wanted = PROVIDERS[provider]
    if wanted not in ort.get_available_providers():
        raise PipelineError(f"the installed onnxruntime has no {wanted} (it has "
                            f"{', '.join(ort.get_available_providers())}); install onnxruntime-gpu for --provider cuda")
    try:
        if prepack is None:
            prepack = provider != "cpu" or prepack_fits(path)
        options = session_options(threads, prepack, arena)
        source = str(path)
        if model is not None:
            options.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                             str(Path(path).resolve().parent))
            source = model.SerializeToString()
        return ort.InferenceSession(source, options, providers=list(dict.fromkeys([wanted, "CPUExecutionProvider"])))
    except Exception as exc:  # ORT raises Fail / InvalidGraph / NotImplemented with long texts
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PipelineError(f"onnxruntime {ort.__version__} cannot load {path}: {first[:400]}") from None


@dataclass
class KVSpec:
    layers: int
    kv_heads: int
    head_dim: int
    dtype: type


@dataclass
class IOInfo:
    name: str
    type: str
    shape: list


class GraphIO:
    """What a merged decoder expects, discovered from its graph: input/output names, mask dtype, KV spec.

    Built from a live session or from the ONNX file alone (no weights loaded), so calibration can
    build feeds for a model it has not opened in onnxruntime. :meth:`feeds` is the one feed builder."""

    def __init__(self, inputs: list[IOInfo], outputs: list[str], config: dict, where: str, right_padded: bool = False,
                 optional: tuple[str, ...] = ()):
        self.where = where
        # the fused stage's optional input: the lm_head runs on the last N positions only (pipeline/graph/fusions.py)
        self.selects_logits = LOGITS_TO_KEEP in optional
        self.right_padded = right_padded  # GroupQueryAttention: lengths from the mask, padding on the right
        self.config = config
        byname = {i.name: i for i in inputs}
        self.input_names = set(byname)
        self.output_names = list(outputs)
        if "input_ids" not in byname:
            raise PipelineError(f"{where} has no input_ids input: not a causal-LM decoder")
        if "logits" not in self.output_names:
            raise PipelineError(f"{where} has no logits output: not a causal-LM decoder")
        past = sorted(((int(m[1]), m[2], n) for n in byname if (m := PAST_NAME.match(n))))
        self.past_names = [n for _, _, n in past]
        self.present_names = [n.replace("past_key_values", "present") for n in self.past_names]
        missing = [n for n in self.present_names if n not in self.output_names]
        if missing:
            raise PipelineError(f"{where} lacks KV outputs {missing[:2]}...: export with KV cache")
        self.kv = self._kv_spec(byname[self.past_names[0]]) if self.past_names else None
        mask = byname.get("attention_mask")
        self.mask_dtype = ONNX_DTYPES.get(mask.type, np.int64) if mask is not None else None

    @classmethod
    def from_session(cls, session, config: dict, where: str, right_padded: bool = False) -> "GraphIO":
        return cls([IOInfo(i.name, i.type, list(i.shape)) for i in session.get_inputs()],
                   [o.name for o in session.get_outputs()], config, where, right_padded,
                   tuple(i.name for i in session.get_overridable_initializers()))

    @classmethod
    def from_onnx(cls, path: str | Path, config: dict) -> "GraphIO":
        import onnx

        model = onnx.load(str(path), load_external_data=False)
        init = {t.name for t in model.graph.initializer}

        def info(v):
            tt = v.type.tensor_type
            dtype = "tensor(" + {1: "float", 10: "float16", 7: "int64", 6: "int32", 3: "int8", 16: "bfloat16"}.get(
                tt.elem_type, str(tt.elem_type)) + ")"
            dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim]
            return IOInfo(v.name, dtype, dims)

        return cls([info(v) for v in model.graph.input if v.name not in init],
                   [o.name for o in model.graph.output], config, str(path), uses_gqa(model),
                   tuple(v.name for v in model.graph.input if v.name in init))

    def _kv_spec(self, first: IOInfo) -> KVSpec:
        dtype = ONNX_DTYPES.get(first.type)
        if dtype is None:
            raise PipelineError(f"unsupported KV-cache dtype {first.type} in {self.where}")
        shape, cfg = first.shape, self.config  # [batch, kv_heads, past_len, head_dim]; symbolic dims are str/None
        _, cfg_kv_heads, cfg_head_dim = attention_shape(cfg)
        heads = shape[1] if isinstance(shape[1], int) else cfg_kv_heads
        head_dim = shape[3] if isinstance(shape[3], int) else cfg_head_dim
        return KVSpec(layers=len(self.past_names) // 2, kv_heads=int(heads), head_dim=int(head_dim), dtype=dtype)

    def empty_past(self, batch: int = 1) -> list[np.ndarray]:
        kv = self.kv
        return [np.zeros((batch, kv.kv_heads, 0, kv.head_dim), dtype=kv.dtype) for _ in self.past_names]

    def feeds(self, input_ids: np.ndarray, past: list[np.ndarray] | None = None,
              attention_mask: np.ndarray | None = None, with_past: bool = True,
              keep: int = 0) -> dict[str, np.ndarray]:
        """Inputs for one step: ``input_ids`` (batch, T) after ``past`` (None = empty past of length 0).

        ``attention_mask`` (batch, past + T), 0 on padding, is given for a padded batch; position ids
        then count only the real tokens, so each row sees the positions it would see alone.
        ``with_past=False`` leaves the KV inputs out (the caller binds shared KV buffers itself; the
        mask then says how long each row is). ``keep`` N > 0: logits of the last N positions only, where
        the graph takes ``logits_to_keep`` (graphs without it return every position's)."""
        input_ids = np.asarray(input_ids, dtype=np.int64)
        if input_ids.ndim == 1:
            input_ids = input_ids[None]
        batch, length = input_ids.shape
        past_len = 0 if not past else past[0].shape[2]
        feeds = {"input_ids": input_ids}
        if attention_mask is None:
            mask = np.ones((batch, past_len + length), dtype=np.int64)
            positions = np.broadcast_to(np.arange(past_len, past_len + length, dtype=np.int64), (batch, length)).copy()
        else:
            mask = np.asarray(attention_mask, dtype=np.int64)
            expected = (batch, past_len + length) if with_past else (batch, mask.shape[1])
            if mask.shape != expected or mask.shape[1] < length:
                raise PipelineError(f"attention mask of shape {mask.shape} for {batch} rows of {past_len} + {length} tokens")
            if self.right_padded and (np.diff(mask, axis=1) > 0).any():
                raise PipelineError(f"{self.where} runs GroupQueryAttention, which reads each row's length from the "
                                    f"mask: pad on the right (the runtime's generate_batch does)")
            positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)[:, mask.shape[1] - length:]
        if self.mask_dtype is not None:
            feeds["attention_mask"] = mask.astype(self.mask_dtype)
        elif attention_mask is not None and not mask.all():
            raise PipelineError(f"{self.where} has no attention_mask input: it cannot run a padded batch")
        if "position_ids" in self.input_names:
            feeds["position_ids"] = positions
        if self.selects_logits:
            feeds[LOGITS_TO_KEEP] = np.array(keep, dtype=np.int64)
        if self.past_names and with_past:
            for name, value in zip(self.past_names, past or self.empty_past(batch), strict=True):
                feeds[name] = value
        return feeds


class SharedKV:
    """KV buffers allocated once for the whole generation and bound as both past and present
    (GroupQueryAttention writes each step's keys/values in place): no per-step concatenation or copy.
    On CUDA the buffers live on the device; only ids, mask and logits cross."""

    def __init__(self, session, io: GraphIO, batch: int, max_len: int, device: str = "cpu"):
        import onnxruntime as ort

        kv = io.kv
        shape = (batch, kv.kv_heads, max_len, kv.head_dim)
        self._host = []  # CPU buffers: numpy owns the memory the OrtValues point at
        self.buffers = []
        for _ in io.past_names:
            if device == "cpu":
                self._host.append(np.zeros(shape, dtype=kv.dtype))
                self.buffers.append(ort.OrtValue.ortvalue_from_numpy(self._host[-1]))
            else:
                self.buffers.append(ort.OrtValue.ortvalue_from_shape_and_type(shape, kv.dtype, device, 0))
        self.binding = session.io_binding()
        self.binding.bind_output("logits", "cpu")  # first: get_outputs() follows the binding order
        for past, present, value in zip(io.past_names, io.present_names, self.buffers, strict=True):
            self.binding.bind_ortvalue_input(past, value)
            self.binding.bind_ortvalue_output(present, value)
        self.session, self.io, self.max_len = session, io, max_len
        self._optional = {}  # OrtValues bound to optional inputs: alive until the next step
        out = next(o for o in session.get_outputs() if o.name == "logits")
        vocab = out.shape[2] if isinstance(out.shape[2], int) else None
        self._decode_logits = (np.empty((batch, 1, vocab), dtype=ONNX_DTYPES.get(out.type, np.float32))
                               if vocab else None)  # one-token steps write their logits here
        self._decode_out = (ort.OrtValue.ortvalue_from_numpy(self._decode_logits)
                            if self._decode_logits is not None else None)

    def step(self, input_ids: np.ndarray, mask: np.ndarray, keep: int = 0) -> np.ndarray:
        """One step of ``input_ids`` (batch, T) after what the buffers hold; the mask says how long each row
        is. Returns the logits of every position, or of the last ``keep`` (graphs with ``logits_to_keep``).
        One-position logits land in a buffer reused by the next step: read them before it."""
        if mask.shape[1] > self.max_len:
            raise PipelineError(f"the KV buffers hold {self.max_len} positions; step asks for {mask.shape[1]}")
        import onnxruntime as ort

        for name, value in self.io.feeds(input_ids, None, mask, with_past=False, keep=keep).items():
            if name in self.io.input_names:
                self.binding.bind_cpu_input(name, np.ascontiguousarray(value))
            else:  # an overridable initializer (logits_to_keep): bind_cpu_input looks only at required inputs
                self._optional[name] = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value))
                self.binding.bind_ortvalue_input(name, self._optional[name])
        one = input_ids.shape[1] == 1 or (keep == 1 and self.io.selects_logits)
        if one and self._decode_out is not None:
            self.binding.bind_ortvalue_output("logits", self._decode_out)
            self.session.run_with_iobinding(self.binding)
            return self._decode_logits
        self.binding.bind_output("logits", "cpu")
        self.session.run_with_iobinding(self.binding)
        return self.binding.get_outputs()[0].numpy()

    def copy_row(self, row: int, other: "SharedKV", length: int) -> None:
        """Row ``row`` of these buffers := the first ``length`` positions of ``other``'s row 0 (a prompt
        prefilled alone, see :meth:`Runtime.prefill`)."""
        for j, value in enumerate(self.buffers):
            if self._host:
                self._host[j][row, :, :length] = other._host[j][0, :, :length]
            else:  # device buffers: through the host, once per prompt
                host = value.numpy()
                host[row, :, :length] = other.buffers[j].numpy()[0, :, :length]
                value.update_inplace(host)


class Runtime:
    """ONNX Runtime session over a merged decoder with ``past_key_values.*`` inputs."""

    def __init__(self, artifact_dir: str | Path, provider: str = "cpu", threads: int | None = None,
                 prefill_chunk: int | None = None, grouped_from: int | None = GROUPED_DECODE_FROM):
        """``prefill_chunk``: prompt tokens per prefill step (default :data:`DEFAULT_PREFILL_CHUNK`; it
        shrinks at long contexts to keep ORT's attention workspace under :data:`ATTENTION_WORKSPACE_BYTES`).
        ``grouped_from``: on the CPU, decode steps at this many positions or more read each KV group once
        (pipeline/graph/decode.py); None keeps ORT's GroupQueryAttention kernel at every step."""
        import onnx

        if prefill_chunk is not None and prefill_chunk < 1:
            raise PipelineError(f"prefill_chunk must be at least 1 (got {prefill_chunk})")
        self.prefill_chunk = prefill_chunk or DEFAULT_PREFILL_CHUNK
        self.dir = Path(artifact_dir)
        graph = onnx.load(str(model_path(self.dir)), load_external_data=False)
        gqa = uses_gqa(graph)
        self.grouped_layers = 0  # GroupQueryAttention nodes given the grouped decode branch
        if gqa and provider == "cpu" and grouped_from is not None:
            from pipeline.graph.decode import group_decode_attention

            self.grouped_layers = group_decode_attention(graph, grouped_from)
        # A concatenated KV cache grows every step, and ORT's CPU arena keeps each step's freed cache as a
        # chunk too small for the next step's: a growing Concat alone then holds three copies, not the two
        # of past + present. Such graphs (the export) run without the arena (benchmarks/arena_memory.py
        # measures both); GQA graphs bind buffers of a fixed size (SharedKV) and keep it.
        self.session = make_session(model_path(self.dir), provider, threads, arena=gqa,
                                    model=graph if self.grouped_layers else None)
        del graph
        self.device = "cuda" if provider == "cuda" else "cpu"
        self.config = _read_json(self.dir / "config.json")
        self.io = GraphIO.from_session(self.session, self.config, f"{self.dir}/model.onnx", right_padded=gqa)
        self.eos_ids = _eos_ids(self.dir, self.config)
        self._tokenizer = None

    def forward(self, input_ids: np.ndarray, past: list[np.ndarray] | None = None,
                attention_mask: np.ndarray | None = None, keep: int = 0):
        """One step: returns (logits float32 (batch, T or keep, V), present KV list)."""
        outs = self.session.run(["logits"] + self.io.present_names,
                                self.io.feeds(input_ids, past, attention_mask, keep=keep))
        return outs[0].astype(np.float32, copy=False), outs[1:]

    def chunk_for(self, kv_len: int) -> int:
        """Prompt tokens per prefill step for KV buffers of ``kv_len`` positions: ``prefill_chunk``, less
        where ORT's CPU attention workspace (float32 scores, chunk x kv_len per head) would pass
        :data:`ATTENTION_WORKSPACE_BYTES`."""
        return prefill_chunk(self.config, kv_len, self.prefill_chunk)

    def _chunks(self, length: int, kv_len: int):
        step = self.chunk_for(kv_len)
        return [(s, min(length, s + step)) for s in range(0, length, step)]

    def logits(self, ids: np.ndarray, last: int = 0) -> np.ndarray:
        """Logits of one sequence (no past) at every position, or at the last ``last`` only: the scorer
        interface of evaluation. Fed in prefill chunks, so memory is bounded by the chunk and the
        positions asked for, never the square of the sequence."""
        ids = np.asarray(ids, dtype=np.int64)
        n = len(ids)
        first = n - last if 0 < last < n else 0  # the first position whose logits are returned
        rows, past = [], None
        cache = SharedKV(self.session, self.io, 1, n, self.device) if self.io.right_padded else None
        mask = np.ones((1, n), dtype=np.int64)
        for s, e in self._chunks(n, n):
            keep = max(e - max(s, first), 1) if self.io.selects_logits else 0
            if cache is not None:
                out = cache.step(ids[None, s:e], mask[:, :e], keep=keep)
            else:
                out, past = self.forward(ids[None, s:e], past, keep=keep)
            if e > first:
                rows.append(np.array(out[0, -(e - max(s, first)):], dtype=np.float32))
        return np.concatenate(rows)

    def prefill(self, cache: "SharedKV | None", ids: np.ndarray, mask: np.ndarray, lengths: np.ndarray):
        """Feed the (padded) prompts ``ids`` in chunks; returns (each row's last-position logits (rows, V),
        the concatenated past, or None with shared buffers). Rows of one length go through together;
        a ragged batch under GroupQueryAttention is prefilled a row at a time into a one-row buffer
        and copied into the batch's (GQA reads each row's past length from the mask, so a chunk after
        the first cannot carry padding)."""
        rows, width = ids.shape
        keep = 1 if self.io.selects_logits else 0
        if cache is None or (lengths == width).all():
            past, out = None, None
            for s, e in self._chunks(width, cache.max_len if cache else width):
                if cache is not None:
                    out = cache.step(ids[:, s:e], mask[:, :e], keep=keep)
                else:
                    out, past = self.forward(ids[:, s:e], past, mask[:, :e], keep=keep)
            # right-padded rows are all full here; left-padded ones end at the last column
            return np.array(out[:, -1], dtype=np.float32), past
        last = []
        single = SharedKV(self.session, self.io, 1, int(lengths.max()), self.device)
        for i, n in enumerate(lengths):
            ones = np.ones((1, int(n)), dtype=np.int64)
            for s, e in self._chunks(int(n), cache.max_len):
                out = single.step(ids[i:i + 1, s:e], ones[:, :e], keep=keep)
            last.append(np.array(out[0, -1], dtype=np.float32))
            cache.copy_row(i, single, int(n))
        return np.stack(last), None

    def decode_path_logits(self, ids, prefix: int = 1) -> np.ndarray:
        """The logits generation computes along ``ids``, teacher-forced: ``prefix`` tokens prefilled, then
        one token a step through the KV cache (under GroupQueryAttention: the shared KV buffers and IO
        binding of :meth:`generate_batch`). Row i predicts token ``prefix + i``: (len(ids) - prefix + 1, V)."""
        ids = np.asarray(ids, dtype=np.int64)
        n = len(ids)
        if not 1 <= prefix <= n:
            raise PipelineError(f"decode path: prefix {prefix} outside 1..{n}")
        cache = SharedKV(self.session, self.io, 1, n, self.device) if self.io.right_padded else None
        mask = np.ones((1, n), dtype=np.int64)
        first, past = self.prefill(cache, ids[None, :prefix], mask[:, :prefix], np.array([prefix]))
        rows = [first[0]]
        for i in range(prefix, n):
            if cache is not None:
                rows.append(np.array(cache.step(ids[None, i:i + 1], mask[:, :i + 1])[0, -1], dtype=np.float32))
            else:
                logits, past = self.forward(ids[None, i:i + 1], past)
                rows.append(logits[0, -1].copy())
        return np.stack(rows)

    # ------------------------------------------------------------------------------------------ tokens
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.dir)
        return self._tokenizer

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def greedy(self, ids: list[int], max_new_tokens: int) -> list[int]:
        """Fixed-length greedy continuation (EOS ignored), for parity checks."""
        return self.generate(list(ids), max_new_tokens, stop_at_eos=False)

    def generate(self, prompt_ids: list[int], max_new_tokens: int = 64, *, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int = 0, stop_at_eos: bool = True,
                 on_token: Callable[[int], None] | None = None) -> list[int]:
        """Prefill the prompt, then decode one token at a time with the KV cache.

        ``temperature`` 0 is greedy; otherwise seeded sampling with optional top-k / top-p."""
        return self.generate_batch([prompt_ids], max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                   seed=seed, stop_at_eos=stop_at_eos, on_token=on_token)[0]

    @property
    def context(self) -> int | None:
        """The longest sequence the model takes (config max_position_embeddings), if it says."""
        limit = self.config.get("max_position_embeddings")
        return int(limit) if limit else None

    def memory_needed(self, rows: int, positions: int, prompt: int) -> dict:
        """What a request of ``rows`` sequences, ``positions`` long in all (prompt + new tokens), of which
        ``prompt`` are prefilled, adds to this loaded model (:func:`request_memory`)."""
        kv = self.io.kv
        return request_memory(self.config, np.dtype(kv.dtype) if kv else None, rows, positions,
                              min(self.chunk_for(positions), prompt), shared_kv=self.io.right_padded,
                              selects_logits=self.io.selects_logits)

    def check_request(self, prompts: list[list[int]], max_new_tokens: int) -> int:
        """Refuse what cannot run, in one line; return the new-token budget that fits the context
        (generation stops at the context's end: the documented behaviour for a long prompt plus a long
        ``max_new_tokens``) and the memory this machine has free (:func:`available_memory`)."""
        if max_new_tokens < 1:
            raise PipelineError(f"max_new_tokens must be at least 1 (got {max_new_tokens})")
        if not prompts or any(len(p) == 0 for p in prompts):
            raise PipelineError("the prompt is empty" + (f" (prompt {next(i for i, p in enumerate(prompts) if not p) + 1} "
                                                         f"of {len(prompts)})" if len(prompts) > 1 else ""))
        longest = max(len(p) for p in prompts)
        if self.context and longest >= self.context:
            raise PipelineError(f"the prompt has {longest} tokens; the model's context is {self.context} "
                                f"(max_position_embeddings), leaving no room to generate: shorten the prompt")
        budget = min(max_new_tokens, self.context - longest) if self.context else max_new_tokens
        need = self.memory_needed(len(prompts), longest + budget, longest)
        free = available_memory()
        if free is not None and need["total"] > free:
            raise PipelineError(
                f"{len(prompts)} x {longest + budget:,} positions ({longest:,} prompt + {budget:,} new) need "
                f"{need['total'] / 2**30:.2f} GiB beyond the loaded model (KV cache {need['kv_cache'] / 2**30:.2f} GiB "
                f"{need['kv_dtype']}, attention workspace {need['workspace'] / 2**30:.2f} GiB, logits "
                f"{need['logits'] / 2**30:.2f} GiB); {free / 2**30:.2f} GiB is available: fewer or shorter requests, "
                f"fewer --max-new-tokens, or an artifact with a float16 KV cache (docs/long-context.md)")
        return budget

    def generate_batch(self, prompts: list[list[int]], max_new_tokens: int = 64, *, temperature: float = 0.0,
                       top_k: int = 0, top_p: float = 1.0, seed: int = 0, stop_at_eos: bool = True,
                       on_token: Callable[[int], None] | None = None) -> list[list[int]]:
        """Several prompts of any lengths at once: padded, masked, each row's positions its own.

        Graphs with GroupQueryAttention are right-padded and decode into KV buffers allocated once
        (past and present bound to the same memory); other graphs are left-padded and concatenate
        their KV cache. Each row stops at its EOS (or the budget); the result holds each row's new
        tokens only. ``on_token`` streams the tokens of a single prompt."""
        if on_token is not None and len(prompts) != 1:
            raise PipelineError("on_token streams one prompt; a batch returns its rows when done")
        max_new_tokens = self.check_request(prompts, max_new_tokens)
        rng = np.random.default_rng(seed)
        rows, width = len(prompts), max(len(p) for p in prompts)
        lengths = np.array([len(p) for p in prompts])
        right = self.io.right_padded
        pad = int(self.config.get("pad_token_id") or min(self.eos_ids, default=0))  # masked out anyway
        ids = np.full((rows, width), pad, dtype=np.int64)
        mask = np.zeros((rows, width + max_new_tokens), dtype=np.int64)  # filled in place, a prefix is fed
        for i, p in enumerate(prompts):
            start = 0 if right else width - len(p)
            ids[i, start:start + len(p)] = p
            mask[i, start:start + len(p)] = 1
        cache = SharedKV(self.session, self.io, rows, width + max_new_tokens, self.device) if right else None
        last, past = self.prefill(cache, ids, mask[:, :width], lengths)
        out: list[list[int]] = [[] for _ in prompts]
        done = np.zeros(rows, dtype=bool)
        for step in range(max_new_tokens):
            nxt = np.array([sample(last[i], rng, temperature, top_k, top_p) for i in range(rows)])
            for i in np.flatnonzero(~done):
                out[i].append(int(nxt[i]))
                if on_token:
                    on_token(int(nxt[i]))
                done[i] |= stop_at_eos and int(nxt[i]) in self.eos_ids
            if done.all() or step == max_new_tokens - 1:
                break
            if right:
                mask[np.arange(rows), lengths + step] = 1
                last = cache.step(nxt[:, None], mask[:, :width + step + 1])[:, -1]
            else:
                mask[:, width + step] = 1
                logits, past = self.forward(nxt[:, None], past, mask[:, :width + step + 1])
                last = logits[:, -1]
        return out


def prefill_chunk(config: dict, kv_len: int, wanted: int | None = None) -> int:
    """Prompt tokens per prefill step for KV buffers of ``kv_len`` positions: ``wanted`` (default
    :data:`DEFAULT_PREFILL_CHUNK`), less where ORT's CPU attention workspace (float32 scores, chunk x
    kv_len per head) would pass :data:`ATTENTION_WORKSPACE_BYTES`."""
    heads = attention_shape(config)[0]
    return max(1, min(wanted or DEFAULT_PREFILL_CHUNK, ATTENTION_WORKSPACE_BYTES // (4 * heads * max(kv_len, 1))))


def kv_cache_bytes(config: dict, positions: int, itemsize: int, rows: int = 1) -> int:
    """One copy of the KV cache: rows x positions x 2 (key, value) x layers x kv_heads x head_dim x itemsize."""
    _, kv_heads, head_dim = attention_shape(config)
    return rows * positions * 2 * int(config.get("num_hidden_layers") or 0) * kv_heads * head_dim * itemsize


def request_memory(config: dict, kv_dtype, rows: int, positions: int, chunk: int, *, shared_kv: bool = True,
                   selects_logits: bool = True) -> dict:
    """Bytes a generation request needs beyond the weights (the formula of docs/long-context.md):

    - KV cache: rows x positions x 2 (key, value) x layers x kv_heads x head_dim x dtype bytes; shared
      buffers under GroupQueryAttention, two copies at the last step where the cache is concatenated;
    - attention workspace of one prefill chunk: chunk x positions x heads x 4 (ORT's CPU GQA keeps
      float32 scores over the whole KV buffer), plus the chunk's activations (hidden and MLP widths),
      for every row (ragged GQA batches prefill a row at a time: an upper bound there);
    - logits: rows x vocab x 4 with ``logits_to_keep`` (the last position), else x chunk."""
    heads = attention_shape(config)[0]
    vocab = int(config.get("vocab_size") or 0)
    hidden = int(config.get("hidden_size") or 0)
    inter = int(config.get("intermediate_size") or 4 * hidden)
    itemsize = np.dtype(kv_dtype).itemsize if kv_dtype is not None else 0
    kv_bytes = kv_cache_bytes(config, positions, itemsize, rows) * (1 if shared_kv else 2)
    workspace = rows * chunk * (4 * heads * positions + 4 * (4 * hidden + 2 * inter))
    logits = rows * vocab * 4 * (1 if selects_logits else chunk)
    return {"kv_cache": kv_bytes, "workspace": workspace, "logits": logits, "total": kv_bytes + workspace + logits,
            "kv_dtype": np.dtype(kv_dtype).name if kv_dtype is not None else None}


def sample(logits: np.ndarray, rng: np.random.Generator, temperature: float = 0.0, top_k: int = 0,
           top_p: float = 1.0) -> int:
    if temperature <= 0:
        return int(np.argmax(logits))
    x = logits.astype(np.float64) / temperature
    if 0 < top_k < x.size:
        kth = np.partition(x, -top_k)[-top_k]
        x = np.where(x < kth, -np.inf, x)
    p = np.exp(x - x.max())
    p /= p.sum()
    if top_p < 1.0:
        order = np.argsort(-p)
        keep = np.cumsum(p[order]) - p[order] < top_p  # smallest prefix whose mass reaches top_p
        mask = np.zeros_like(p, dtype=bool)
        mask[order[keep]] = True
        p = np.where(mask, p, 0.0)
        p /= p.sum()
    return int(rng.choice(p.size, p=p))


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise PipelineError(f"{path} not found: the artifact is incomplete")
    return json.loads(path.read_text())


def special_token_id(directory: Path, key: str) -> int | None:
    """The id of the tokenizer's ``eos_token`` / ``bos_token`` (tokenizer_config.json names it, tokenizer.json
    numbers it), for checkpoints whose config.json leaves the id null (Qwen2's defaults do)."""
    config, tokenizer = directory / "tokenizer_config.json", directory / "tokenizer.json"
    if not (config.is_file() and tokenizer.is_file()):
        return None
    token = json.loads(config.read_text()).get(key)
    if isinstance(token, dict):  # AddedToken serialized
        token = token.get("content")
    if not isinstance(token, str):
        return None
    data = json.loads(tokenizer.read_text())
    for added in data.get("added_tokens") or ():
        if added.get("content") == token:
            return int(added["id"])
    vocab = (data.get("model") or {}).get("vocab")
    return int(vocab[token]) if isinstance(vocab, dict) and token in vocab else None


def _eos_ids(directory: Path, config: dict) -> set[int]:
    ids = config.get("eos_token_id")
    gen = directory / "generation_config.json"
    if gen.is_file():
        ids = json.loads(gen.read_text()).get("eos_token_id", ids)
    if ids is None:
        ids = special_token_id(directory, "eos_token")  # as genai_config.json names it (pipeline/consumer/genai.py)
    if ids is None:
        return set()
    return set(ids) if isinstance(ids, list) else {int(ids)}
