"""Task accuracy through lm-evaluation-harness (pipeline/scoring/tasks.py): our runtime as an lm-eval model,
checked against lm-eval's own HF backend on the PyTorch checkpoint, and `pipeline evaluate --tasks`."""

import json

import numpy as np
import pytest

from tests.conftest import REPO, assert_clean_failure, run_cli


@pytest.fixture(scope="module")
def cloze(data_dir, tmp_path_factory):
    """The local cloze task's documents, built from the held-out text as `pipeline evaluate` builds them."""
    from pipeline.scoring import tasks
    from pipeline.text.sources import read_split

    dest = tmp_path_factory.mktemp("tasks")
    tasks.local_tasks(read_split(data_dir, "eval"), dest, docs=40)
    return [json.loads(line) for line in (dest / "pipeline_cloze.jsonl").read_text().splitlines()]


def _requests(kind: str, args: list[tuple]) -> list:
    from lm_eval.api.instance import Instance

    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def test_each_choice_scores_as_lm_evals_hf_backend_scores_the_checkpoint(cloze, checkpoint_dir, export_dir):
    """The export through our runtime and the PyTorch checkpoint through lm-eval's HFLM give every choice
    of every document the same log-likelihood (to 1e-4) and the same is-greedy flag; and the same
    rolling log-likelihood of whole lines (lm-eval's perplexity tasks)."""
    from lm_eval.models.huggingface import HFLM

    from pipeline.scoring.tasks import ArtifactLM

    ours, theirs = ArtifactLM(artifact=str(export_dir)), HFLM(pretrained=str(checkpoint_dir), device="cpu",
                                                               dtype="float32", batch_size=1)
    assert (ours.eot_token_id, ours.prefix_token_id) == (theirs.eot_token_id, theirs.prefix_token_id)
    args = [(doc["context"], choice) for doc in cloze for choice in doc["choices"]]
    a, b = ours.loglikelihood(_requests("loglikelihood", args)), theirs.loglikelihood(_requests("loglikelihood", args))
    assert len(a) == len(b) == 4 * len(cloze)
    assert np.abs(np.array([x[0] for x in a]) - np.array([x[0] for x in b])).max() < 1e-4
    assert [x[1] for x in a] == [x[1] for x in b]
    assert len({round(x[0], 3) for x in a}) > len(a) // 2  # the choices do differ
    lines = [(doc["context"],) for doc in cloze[:8]]
    ra, rb = (lm.loglikelihood_rolling(_requests("loglikelihood_rolling", lines)) for lm in (ours, theirs))
    assert np.abs(np.array(ra) - np.array(rb)).max() < 1e-4


def test_generation_requests_continue_as_the_checkpoint_does(cloze, checkpoint_dir, export_dir):
    """generate_until: greedy, cut at the stop strings, the checkpoint's text under lm-eval's HF backend."""
    from lm_eval.models.huggingface import HFLM

    from pipeline.scoring.tasks import ArtifactLM

    args = [(doc["context"], {"until": ["\n", "."], "max_gen_toks": 8, "do_sample": False}) for doc in cloze[:12]]
    ours = ArtifactLM(artifact=str(export_dir)).generate_until(_requests("generate_until", args))
    theirs = HFLM(pretrained=str(checkpoint_dir), device="cpu", dtype="float32",
                  batch_size=1).generate_until(_requests("generate_until", args))
    assert ours == theirs
    assert all("\n" not in t and "." not in t for t in ours) and any(t.strip() for t in ours)


def test_evaluate_scores_tasks_and_gates_their_drop(derived, export_dir, data_dir, tmp_path):
    """`pipeline evaluate --tasks`: each task's figure with lm-eval's stderr and the reference's, their mean
    and its drop; a budget on the drop holds or fails like any other; asked for no task, the budget says
    it was not applied rather than failing."""
    out = tmp_path / "m.json"
    common = ["--artifact", str(derived("int4")), "--reference", str(export_dir), "--data", str(data_dir),
              "--name", "int4", "--params", str(REPO / "params.yaml"), "-S", "tasks.docs=60"]
    proc = run_cli("evaluate", *common, "--tasks", "cloze,next_word", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    m = json.loads(out.read_text())
    assert set(m["tasks"]) == {"pipeline_cloze", "pipeline_next_word"}
    for figures in m["tasks"].values():
        assert 0 <= figures["value"] <= 1 and 0 <= figures["reference"] <= 1 and figures["stderr"] is not None
    cloze_acc = m["tasks"]["pipeline_cloze"]
    assert cloze_acc["value"] > 0.25 + 2 * cloze_acc["stderr"]  # above chance (4 choices): the model reads the text
    assert m["task_acc"] == pytest.approx(np.mean([f["value"] for f in m["tasks"].values()]), abs=1e-6)
    ref_mean = np.mean([f["reference"] for f in m["tasks"].values()])
    assert m["task_acc_drop"] == pytest.approx(ref_mean - m["task_acc"], abs=1e-6)
    assert "task accuracy" in proc.stdout

    impossible = m["task_acc_drop"] - 0.5
    proc = run_cli("evaluate", *common, "--tasks", "cloze,next_word", "-S", f"budgets.int4.max_task_acc_drop={impossible}")
    assert proc.returncode != 0 and "task_acc_drop" in proc.stderr, proc.stderr
    proc = run_cli("evaluate", *common, "--tasks", "none", "-S", f"budgets.int4.max_task_acc_drop={impossible}",
                   "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    status = json.loads(out.read_text())["budget"]["status"]
    assert status.startswith("pass") and "max_task_acc_drop" in status and "not applied" in status


def test_an_unknown_task_is_one_line(derived, export_dir, data_dir, tmp_path):
    proc = run_cli("evaluate", "--artifact", str(derived("int4")), "--reference", str(export_dir), "--data",
                   str(data_dir), "--tasks", "cloze,no_such_task", "--out", str(tmp_path / "m.json"))
    assert_clean_failure(proc, "unknown task 'no_such_task'", "cloze")
    assert not (tmp_path / "m.json").exists()


def test_a_stage_scores_tasks_when_built_and_its_card_shows_them(fused_dir, export_dir, data_dir, tmp_path):
    """With tasks.names set, the stage measures them when it builds (the figures go into the manifest and
    the model card); `pipeline evaluate` then reuses them, and the reference's are computed once."""
    from pipeline.consumer import manifest as mf
    from tests.conftest import build, scoring, small_params

    params = small_params("tasks.names=[cloze]", "tasks.docs=40", "int4.algorithm=rtn")
    out = tmp_path / "int4"
    manifest = build("int4", params, fused_dir, out, scoring(params, data_dir, export_dir))
    ev = manifest["metrics"]["eval"]
    assert set(ev["tasks"]) == {"pipeline_cloze"} and ev["tasks_asked"] == {"names": ["cloze"], "docs": 40}
    assert "task_acc_drop" in ev
    card = (out / mf.CARD).read_text()
    assert "Task accuracy" in card and "`pipeline_cloze`" in card
    proc = run_cli("evaluate", "--artifact", str(out), "--reference", str(export_dir), "--data", str(data_dir),
                   "--params", str(REPO / "params.yaml"), "-S", "tasks.names=[cloze]", "-S", "tasks.docs=40",
                   "-S", "eval.max_windows=12", "--name", "int4", "--out", str(tmp_path / "m.json"))
    assert proc.returncode == 0, proc.stderr
    assert "task figures recorded when the stage built it" in proc.stderr
    assert json.loads((tmp_path / "m.json").read_text())["tasks"] == ev["tasks"]
    proc = run_cli("evaluate", "--artifact", str(out), "--reference", str(export_dir), "--data", str(data_dir),
                   "--params", str(REPO / "params.yaml"), "-S", "tasks.names=[cloze]", "-S", "tasks.docs=30",
                   "-S", "eval.max_windows=12", "--name", "int4")
    assert proc.returncode == 0, proc.stderr
    assert "int4: tasks: pipeline_cloze" in proc.stderr  # other documents: measured again
    again = run_cli("evaluate", "--artifact", str(out), "--reference", str(export_dir), "--data", str(data_dir),
                    "--params", str(REPO / "params.yaml"), "-S", "tasks.names=[cloze]", "-S", "tasks.docs=30",
                    "-S", "eval.max_windows=12", "--name", "int4")
    assert again.returncode == 0 and "reference tasks: recorded earlier" in again.stderr, again.stderr


def test_lm_evals_own_command_line_runs_our_model(export_dir, data_dir, tmp_path):
    """`pipeline lm-eval`: lm-evaluation-harness's own command line, its options as they are, with our runtime
    as `--model pipeline-onnx` and a task from `--include_path`: the figure `pipeline evaluate` gets on the
    same documents. A missing artifact is one line."""
    from pipeline.scoring import tasks
    from pipeline.text.sources import read_split

    text = read_split(data_dir, "eval")
    tasks.local_tasks(text, tmp_path / "tasks", docs=30)
    out = tmp_path / "out"
    proc = run_cli("lm-eval", "--model", "pipeline-onnx", "--model_args", f"artifact={export_dir}",
                   "--tasks", "pipeline_cloze", "--include_path", str(tmp_path / "tasks"), "--output_path", str(out))
    assert proc.returncode == 0, proc.stderr
    theirs = json.loads(next(out.rglob("results_*.json")).read_text())["results"]["pipeline_cloze"]
    ours = tasks.run(export_dir, ["cloze"], text, docs=30)["pipeline_cloze"]
    assert 0 < theirs["acc,none"] == pytest.approx(ours["value"], abs=1e-6)

    proc = run_cli("lm-eval", "--model", "pipeline-onnx", "--model_args", f"artifact={tmp_path / 'nowhere'}",
                   "--tasks", "pipeline_cloze", "--include_path", str(tmp_path / "tasks"))
    assert_clean_failure(proc, "nowhere")
