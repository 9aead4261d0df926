"""Stage `data`: a text source -> train / calibration / eval splits that never overlap."""

from __future__ import annotations

from pydantic import Field, model_validator

from pipeline.errors import PipelineError
from pipeline.runner import BuildResult, Inputs, Stage
from pipeline.schema import Section
from pipeline.text.sources import SPLITS, load_text_dataset, paragraphs, split_paragraphs


class Fractions(Section):
    train: float = Field(gt=0, lt=1)
    calibration: float = Field(gt=0, lt=1)
    eval: float = Field(gt=0, lt=1)

    @model_validator(mode="after")
    def _sum(self):
        if abs(self.train + self.calibration + self.eval - 1.0) > 1e-6:
            raise ValueError("train + calibration + eval must sum to 1")
        return self


class Data(Section):
    source: str = Field(min_length=1)
    text_column: str = Field(min_length=1)
    seed: int = Field(ge=0)
    fractions: Fractions



def build(_: Inputs, config: Data, tmp) -> BuildResult:
    ds = load_text_dataset(config.source, config.text_column)
    paras = paragraphs(ds, config.text_column)
    if not paras:
        raise PipelineError(f"text source {config.source} holds no text")
    splits = split_paragraphs(paras, config.fractions, config.seed)
    counts = {}
    for name in SPLITS:
        if not splits[name]:
            raise PipelineError(f"text source {config.source} is too small: the {name} split is empty")
        text = "\n\n".join(splits[name]) + "\n"
        (tmp / f"{name}.txt").write_text(text)
        counts[name] = {"paragraphs": len(splits[name]), "chars": len(text)}
    return BuildResult(metrics={"splits": counts}, source={"data": config.source})


def describe(manifest: dict, _: dict) -> str:
    return f"data: {manifest['artifact_id']} " + ", ".join(
        f"{n} {c['paragraphs']} paragraphs / {c['chars'] / 1e3:.0f} KB" for n, c in manifest["metrics"]["splits"].items())


STAGE = Stage(name="data", section="data", config=Data, build=build, describe=describe,
              summary="Train / calibration / eval splits of the text source")
