"""`pipeline tune` with real DVC: candidates queued as experiments and run by DVC's own queue workers, a
second search that re-uses them all, the winning recipe applied and built by `dvc repro` and passed by
`pipeline gate`, and two clones (two machines) that each run half of a grid and share it through a git
remote and a DVC remote, after which one `--collect` sees every candidate."""

import json
import shutil

import pytest
import yaml

from tests.conftest import assert_clean_failure, git, run_cli, sh

pytestmark = pytest.mark.slow

# a small space (the test's; params.yaml's is larger): four moves, one promotion step
SPACE = ("-S", "tune.space.int4={block_size: [64, 128, 256], tied_bits: [4, 8]}",
         "-S", "tune.promote.int4={int8_fraction: [0.5]}")
GRID = ("-S", "tune.space.int4={block_size: [128, 256], tied_bits: [4, 8]}")


@pytest.fixture(scope="module")
def origin(publisher, tmp_path_factory):
    """The built project published the way a team shares one: a bare git repo and a DVC remote."""
    root = tmp_path_factory.mktemp("tune")
    bare, store = root / "origin.git", root / "dvc-store"
    git("init", "-q", "--bare", "-b", "main", str(bare), cwd=root)
    git("add", "-A", cwd=publisher)  # the built state (what the end-to-end tests left: consistent with dvc.lock)
    git("commit", "-q", "--allow-empty", "-m", "tune baseline", cwd=publisher)
    assert json.loads(sh("dvc", "status", "--json", cwd=publisher).stdout) == {}
    sh("dvc", "remote", "add", "--local", "-f", "tune-store", str(store), cwd=publisher)
    sh("dvc", "push", "-q", "-r", "tune-store", cwd=publisher)
    git("push", "-q", str(bare), "HEAD:refs/heads/main", cwd=publisher)
    return bare, store


def clone(origin, dest):
    bare, store = origin
    git("clone", "-q", str(bare), str(dest), cwd=dest.parent)
    sh("dvc", "remote", "add", "--local", "-d", "store", str(store), cwd=dest)
    sh("dvc", "pull", "-q", cwd=dest)
    return dest


def experiments(repo):
    shown = json.loads(sh("dvc", "exp", "show", "--json", cwd=repo).stdout)
    return {e["name"]: e for base in shown for e in base.get("experiments") or []}


def start_kld(repo):
    return json.loads((repo / "metrics" / "int4.json").read_text())["kld_mean"]


def test_the_search_runs_on_dvcs_queue_finds_a_smaller_recipe_and_reuses_it(origin, tmp_path):
    repo = clone(origin, tmp_path / "a")
    budget = 4 * start_kld(repo)  # room for a smaller recipe; the search must find it and prove it
    proc = run_cli("tune", "--budget", f"kld_mean={budget:.6g}", "--workers", "2", *SPACE, cwd=repo, check=True)
    result = json.loads((repo / "reports/tune/result.json").read_text())
    rows = {r["name"]: r for r in json.loads((repo / "reports/tune/candidates.json").read_text())}
    # every candidate is a DVC experiment of this commit that DVC's queue ran
    exps = experiments(repo)
    assert set(rows) <= set(exps), set(rows) - set(exps)
    assert all(exps[n]["executor"]["state"] == "success" for n in rows)
    assert result["candidates"] == len(rows) == result["queued_this_run"] >= 5
    # one progress line per finished candidate, and the summary line
    assert sum("[" in ln and "/" in ln and "size" in ln for ln in proc.stderr.splitlines()) == len(rows)
    assert "winner" in proc.stderr.splitlines()[-1]
    win, start = rows[result["winner"]], rows[result["start"]]
    assert win["size_bytes"] < start["size_bytes"]
    # the experiment's own metrics (dvc exp show) carry the winner's figures
    shown = exps[result["winner"]]["revs"][0]["data"]["metrics"]["metrics/int4.json"]["data"]
    assert shown["kld_mean"] <= budget and shown["size_bytes"] == win["size_bytes"]
    for name in ("front.png", "summary.md", "recipe.yaml"):
        assert (repo / "reports/tune" / name).stat().st_size > 0
    assert "tune-size-vs-kld" in sh("dvc", "plots", "show", "--json", cwd=repo).stdout

    # the same search again: nothing queued, the same winner
    again = run_cli("tune", "--budget", f"kld_mean={budget:.6g}", *SPACE, cwd=repo, check=True)
    second = json.loads((repo / "reports/tune/result.json").read_text())
    assert second["queued_this_run"] == 0 and second["winner"] == result["winner"], again.stderr

    # the recipe, applied: dvc repro builds it (from the run-cache), the gate checks it
    git("add", "reports/tune", cwd=repo)
    git("commit", "-qm", "tune result", cwd=repo)
    run_cli("tune", "--apply", cwd=repo, check=True)
    rep = sh("dvc", "repro", cwd=repo)
    ran = {ln.split("'")[1] for ln in rep.stdout.splitlines() if ln.startswith("Running stage")}
    assert "int4" not in ran, rep.stdout  # DVC restored the candidate's artifact instead of rebuilding it
    built = json.loads((repo / "metrics/int4.json").read_text())
    assert built["size_bytes"] == win["size_bytes"] and built["kld_mean"] <= budget
    assert built["budget"]["status"].startswith("pass")
    assert run_cli("gate", cwd=repo).returncode == 0


def test_two_clones_each_run_half_and_collect_sees_all(origin, tmp_path):
    a, b = clone(origin, tmp_path / "a"), clone(origin, tmp_path / "b")
    budget = f"kld_mean={4 * start_kld(a):.6g}"
    first = run_cli("tune", "--strategy", "grid", "--budget", budget, "--slice", "1/2", "--remote", "origin",
                    *GRID, cwd=a, check=True)
    assert "waiting for" in first.stderr
    run_cli("tune", "--strategy", "grid", "--budget", budget, "--slice", "2/2", "--remote", "origin", *GRID,
            cwd=b, check=True)
    mine_a, mine_b = set(experiments(a)), set(experiments(b))
    run_cli("tune", "--collect", "--strategy", "grid", "--budget", budget, "--remote", "origin", *GRID, cwd=a,
            check=True)
    result = json.loads((a / "reports/tune/result.json").read_text())
    rows = json.loads((a / "reports/tune/candidates.json").read_text())
    # 2 block sizes x 2 table precisions, and the start recipe if it is not one of them (the end-to-end
    # tests may have left the project at another block size)
    start = yaml.safe_load((a / "params.yaml").read_text())["int4"]
    n = 4 + (not (start["block_size"] in (128, 256) and start["tied_bits"] in (4, 8)))
    assert result["complete"] and result["queued_this_run"] == 0
    assert len(rows) == n and all(r["status"] == "success" for r in rows)
    names = {r["name"] for r in rows}
    # a ran its slice (every other candidate from the first) itself; the rest came from b
    assert len(mine_a & names) == (n + 1) // 2 and names <= mine_b | mine_a
    assert result["winner"] in names
    # decode speed is measured here, one artifact at a time, on the pulled candidates too (dvc get)
    run_cli("tune", "--collect", "--strategy", "grid", "--objective", "decode", "--budget", budget, *GRID, cwd=a,
            check=True)
    rows = json.loads((a / "reports/tune/candidates.json").read_text())
    assert all(r["decode_tok_s"] > 0 for r in rows)
    inside = [r for r in rows if r["in_budget"]]
    assert max(inside, key=lambda r: r["decode_tok_s"])["winner"]


def test_bad_requests_are_one_line(origin, tmp_path):
    repo = clone(origin, tmp_path / "c")
    assert_clean_failure(run_cli("tune", "--budget", "speed=3", cwd=repo), "unknown metric")
    assert_clean_failure(run_cli("tune", "--slice", "3/2", cwd=repo), "--slice")
    assert_clean_failure(run_cli("tune", "-S", "int4.block_size=64", cwd=repo), "tune.*")
    (repo / "params.yaml").write_text((repo / "params.yaml").read_text().replace("block_size: 128", "block_size: 64", 1))
    assert_clean_failure(run_cli("tune", cwd=repo), "uncommitted")
    git("checkout", "params.yaml", cwd=repo)
    shutil.rmtree(repo / "artifacts" / "int4")
    assert_clean_failure(run_cli("tune", cwd=repo), "dvc repro")
    assert not (repo / "reports" / "tune").exists()

