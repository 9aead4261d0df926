"""A checkpoint from outside: a local Hugging Face directory or a hub id (networked machines only).
Only what a causal LM needs is copied, weights as safetensors (pickled weights only when
``model.allow_unsafe_pickle_weights`` says so, converted), and every file is hashed into the source."""

from __future__ import annotations

import shutil
from pathlib import Path

from pipeline import families
from pipeline.consumer import manifest as mf
from pipeline.consumer import untrusted
from pipeline.errors import PipelineError
from pipeline.log import info
from pipeline.ops.memory import check as check_memory

# Files copied from a local or hub checkpoint; weights only as safetensors (never pickle).
# (chat_template.jinja: where transformers >= 4.50 saves the chat template)
CHECKPOINT_PATTERNS = ("*.json", "*.safetensors", "tokenizer.model", "merges.txt", "vocab.json", "*.txt", "*.jinja")


PICKLE_WEIGHTS = ("pytorch_model*.bin", "*.pt", "*.pth", "*.ckpt")


def _check_causal_lm(directory: Path, label: str, allow_pickle: bool = False) -> dict:
    cfg_path = directory / "config.json"
    if not cfg_path.is_file():
        raise PipelineError(f"{label} has no config.json: not a Hugging Face checkpoint directory")
    config = untrusted.load_json(cfg_path, f"{label}'s config.json")
    check_memory("checkpoint", config)
    archs = config.get("architectures") or []
    if not any(isinstance(a, str) and a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        raise PipelineError(f"{label} is not a causal LM (architectures: {archs or 'none'}); "
                            f"the pipeline needs a *ForCausalLM checkpoint")
    _supported(config, label)
    if not (directory / "tokenizer.json").is_file():
        raise PipelineError(f"{label} has no tokenizer.json; the pipeline needs the model's fast tokenizer "
                            f"(save it with AutoTokenizer.from_pretrained(...).save_pretrained(dir))")
    if not list(directory.glob("*.safetensors")):
        pickles = sorted(p.name for pat in PICKLE_WEIGHTS for p in directory.glob(pat))
        if not pickles:
            raise PipelineError(f"{label} has no weights (no .safetensors file)")
        if not allow_pickle:
            raise PipelineError(
                f"{label} has only pickled weights ({', '.join(pickles)}): loading a pickle can run arbitrary code. "
                f"Convert them to safetensors where you trust the file, or set "
                f"model.allow_unsafe_pickle_weights=true to accept that risk (they are converted to safetensors once)")
    return config


def _supported(config: dict, label: str) -> None:
    """One line for what no stage can build, before anything is copied: a model type transformers does not
    know, a mixture of experts, a vision-language model, a family pipeline/families/ does not declare."""
    from transformers import CONFIG_MAPPING

    kind = config.get("model_type")
    supported = f"the supported families: {families.names()}"
    if not isinstance(kind, str) or kind not in CONFIG_MAPPING:
        raise PipelineError(f"{label} has model_type {str(kind)[:40]!r}, which the installed transformers does not "
                            f"know: unsupported ({supported})")
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    experts = next((k for k in ("num_experts", "num_local_experts", "n_routed_experts") if text.get(k)), None)
    if experts:
        raise PipelineError(f"{label} is a mixture of experts ({kind}, {experts}={text[experts]}): unsupported "
                            f"({supported})")
    if "vision_config" in config:
        raise PipelineError(f"{label} is a vision-language model ({kind}): unsupported ({supported}); export its "
                            f"text model alone")
    families.of(config, label)


def _convert_pickle(directory: Path, tmp: Path, trust_remote_code: bool) -> None:
    """Load pickled weights once (the user accepted the risk) and store them as safetensors."""
    import torch
    from transformers import AutoModelForCausalLM

    info(f"checkpoint: loading pickled weights from {directory} (model.allow_unsafe_pickle_weights) ...")
    model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32, use_safetensors=False,
                                                 trust_remote_code=trust_remote_code)
    model.save_pretrained(str(tmp), safe_serialization=True)


def _inside(directory: Path, root: Path, patterns) -> list[Path]:
    """The files of ``directory`` matching ``patterns``, each resolved, refused in one line when it leads
    outside ``root`` (a symlink to a file elsewhere on the machine would be copied, hashed and published)
    or is not a regular file (a FIFO would hang the copy)."""
    root, found = root.resolve(), {}
    for pattern in patterns:
        for f in directory.glob(pattern):
            if f.is_dir():
                continue
            real = f.resolve()
            if not real.is_relative_to(root):
                raise PipelineError(f"{f} is a link to {real}, outside the checkpoint directory: refused (copy the "
                                    f"file into the checkpoint if it belongs to it)")
            untrusted.regular(real, "checkpoint file")
            found[f.name] = real
    return [found[name] for name in sorted(found)]


def import_checkpoint(model, tmp: Path) -> dict:
    source, revision = model.source, model.revision
    allow_pickle, trust = model.allow_unsafe_pickle_weights, model.trust_remote_code
    path = Path(source).expanduser()
    if path.exists() or source.startswith(("/", ".", "~")):
        if not path.is_dir():
            raise PipelineError(f"model.source {source}: no such checkpoint directory")
        _check_causal_lm(path, source, allow_pickle)
        hashes = {p.name: mf.sha256_file(p) for p in _inside(path, path, PICKLE_WEIGHTS)}
        for f in _inside(path, path, CHECKPOINT_PATTERNS):
            shutil.copy2(f, tmp / f.name)
        if not list(tmp.glob("*.safetensors")):
            _convert_pickle(path, tmp, trust)
        hashes.update({f.name: mf.sha256_file(f) for f in sorted(tmp.iterdir())})
        src = {"model": str(path.resolve()), "kind": "local", "file_sha256": hashes,
               **({"converted_from_pickle": True} if allow_pickle and not list(path.glob("*.safetensors")) else {})}
    else:
        try:
            from huggingface_hub import snapshot_download

            local = snapshot_download(source, revision=revision, allow_patterns=list(CHECKPOINT_PATTERNS))
        except Exception as exc:  # offline: LocalEntryNotFoundError, ConnectionError, ...
            raise PipelineError(
                f"could not fetch {source!r} from the Hugging Face hub ({type(exc).__name__}): offline or not a "
                f"model id. Download it on a networked machine and set model.source to the local directory") from None
        _check_causal_lm(Path(local), source)  # the hub path fetches safetensors only
        # a hub snapshot's files are links into the repo's blobs/: inside the repo's cache folder
        for f in _inside(Path(local), Path(local).resolve().parent.parent, ("*",)):
            shutil.copy2(f, tmp / f.name)
        src = {"model": source, "kind": "hub", "revision": Path(local).name,
               "file_sha256": {f.name: mf.sha256_file(f) for f in sorted(tmp.iterdir())}}
    return {"source": src, "metrics": {}}
