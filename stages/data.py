"""Stage `data`: a text source -> train / calibration / eval splits that never overlap."""

from __future__ import annotations

from pathlib import Path

from calibration.sources import SPLITS, load_text_dataset, paragraphs, split_paragraphs
from pipeline import store
from pipeline.errors import PipelineError
from pipeline.log import info


def run(params: dict, out: str | Path) -> dict:
    spec = params["source"]
    ds = load_text_dataset(spec, params.get("text_column", "text"))
    paras = paragraphs(ds, params.get("text_column", "text"))
    if not paras:
        raise PipelineError(f"text source {spec} holds no text")
    splits = split_paragraphs(paras, params["fractions"], int(params["seed"]))
    for name in SPLITS:
        if not splits[name]:
            raise PipelineError(f"text source {spec} is too small: the {name} split is empty")
    with store.staging_dir(out) as tmp:
        counts = {}
        for name in SPLITS:
            text = "\n\n".join(splits[name]) + "\n"
            (tmp / f"{name}.txt").write_text(text)
            counts[name] = {"paragraphs": len(splits[name]), "chars": len(text)}
        manifest = store.publish(tmp, out, stage="data", params=params, source={"data": spec},
                                 metrics={"splits": counts})
    info(f"data: {manifest['artifact_id']} " + ", ".join(
        f"{n} {c['paragraphs']} paragraphs / {c['chars'] / 1e3:.0f} KB" for n, c in counts.items()))
    return manifest
