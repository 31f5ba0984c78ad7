"""results/plot_runs.py: a user's runs/ folder to learning curves and a table of final returns."""

import importlib.util
import json
import subprocess
import sys

import matplotlib.image
import numpy as np
import pytest
from conftest import ROOT, assert_clean_failure, run_algorithm

PLOT_RUNS = ROOT / "results" / "plot_runs.py"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def plot_runs(args: list, cwd=ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, PLOT_RUNS, *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=300
    )


def write_run(runs, env_id, exp_name, seed, returns: dict[int, float], normalized=True, status="finished"):
    """A run folder as an algorithm script leaves it: summary.json with one evaluation per step."""
    folder = runs / f"{env_id}__{exp_name}__scripted__{seed}__1700000000"
    folder.mkdir(parents=True)
    evaluations = [
        {
            "step": step,
            "mean_return": value,
            "std_return": 1.0,
            "returns": [value - 1, value + 1],
            "normalized_score": value / 10 if normalized else None,
            "discounted_return_initial": 5.0,
        }
        for step, value in returns.items()
    ]
    summary = {
        "args": {
            "exp_name": exp_name,
            "seed": seed,
            "dataset": f"datasets/{env_id}/scripted.npz",
            "learning_rate": 3e-4,
        },
        "env_id": env_id,
        "dataset": f"datasets/{env_id}/scripted.npz",
        "status": status,
        "steps_done": max(returns),
        "evaluations": evaluations,
        "final_mean_return": evaluations[-1]["mean_return"],
        "final_normalized_score": evaluations[-1]["normalized_score"],
        "wall_time_s": 10.0,
        "eval_time_s": 1.0,
    }
    (folder / "summary.json").write_text(json.dumps(summary))
    return folder


@pytest.fixture
def runs(tmp_path):
    """bc and iql × seeds 1 and 2 on CartPole (iql's seed 2 interrupted after step 200, and without normalized
    scores), one bc run on Pendulum, a run still going (no summary.json) and one with a damaged summary.json."""
    runs = tmp_path / "runs"
    write_run(runs, "CartPole-v1", "bc", 1, {100: 20.0, 200: 60.0, 300: 100.0})
    write_run(runs, "CartPole-v1", "bc", 2, {100: 40.0, 200: 200.0, 300: 300.0})
    write_run(runs, "CartPole-v1", "iql", 1, {100: 10.0, 200: 30.0, 300: 50.0})
    write_run(runs, "CartPole-v1", "iql", 2, {100: 70.0, 200: 150.0}, normalized=False, status="interrupted")
    write_run(runs, "Pendulum-v1", "bc", 1, {100: -900.0, 200: -400.0}, normalized=False)
    (runs / "CartPole-v1__iql__scripted__3__1700000001").mkdir()
    write_run(runs, "CartPole-v1", "bc", 9, {100: 1.0}).joinpath("summary.json").write_text('{"args": {"exp')
    return runs


def assert_png(path):
    assert path.read_bytes()[:8] == PNG_MAGIC
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_curves_and_table(runs):
    result = plot_runs([runs])
    assert result.returncode == 0, result.stderr
    out = result.stdout
    # Final returns: bc (100 + 300) / 2 = 200, population std 100; iql's final evaluations are 50 (step 300) and
    # 150 (step 200, interrupted): 100 ± 50; its normalized score only from seed 1 (5.0, no spread).
    assert "| CartPole-v1 | scripted | bc | 2 | 300 | 200.0 ± 100.0 | 20.0 ± 10.0 |" in out
    assert "| CartPole-v1 | scripted | iql | 2 (1 interrupted) | 200 to 300 | 100.0 ± 50.0 | 5.0 |" in out
    assert "| Pendulum-v1 | scripted | bc | 1 | 200 | -400.0 | – |" in out
    assert "population std" in out
    # the run still going and the damaged file: skipped, one line each, the rest plotted
    assert out.count("skipped ") == 2
    assert "skipped " + str(runs / "CartPole-v1__iql__scripted__3__1700000001") + ": no summary.json" in out
    assert "skipped " + str(runs / "CartPole-v1__bc__scripted__9__1700000000") + ": summary.json is unreadable" in out
    assert "the 2 seeds of iql on CartPole-v1, scripted evaluated different steps" in out
    assert f"wrote {runs / 'curves.png'} (5 runs, 3 lines)" in out
    assert_png(runs / "curves.png")
    assert sorted(path.name for path in runs.iterdir() if path.is_file()) == ["curves.png"]  # no temporary left


def test_each_step_averages_the_seeds_that_have_it(runs):
    spec = importlib.util.spec_from_file_location("plot_runs", PLOT_RUNS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    iql = [module.load_run(folder, ("exp_name",)) for folder in sorted(runs.glob("CartPole-v1__iql__*__[12]__*"))]
    steps, mean, low, high, counts = module.curve(iql, "mean_return")
    assert steps.tolist() == [100, 200, 300] and counts.tolist() == [2, 2, 1]
    assert mean.tolist() == [40.0, 90.0, 50.0] and low.tolist() == [10.0, 30.0, 50.0]
    assert high.tolist() == [70.0, 150.0, 50.0]
    _, normalized, *_ = module.curve(iql, "normalized_score")  # seed 2 has none: seed 1's alone
    assert np.allclose(normalized, [1.0, 3.0, 5.0])


def test_normalized_metric_group_by_and_a_run_folder_given_itself(runs, tmp_path):
    output = tmp_path / "new" / "figure.png"
    result = plot_runs(
        [
            runs,
            runs / "CartPole-v1__bc__scripted__1__1700000000",
            "--metric",
            "normalized",
            "--output",
            output,
            "--group-by",
            "exp_name",
            "seed",
        ]
    )
    assert result.returncode == 0, result.stderr
    assert "| exp_name / seed |" in result.stdout and "(5 runs, 5 lines)" in result.stdout  # runs/x not twice
    assert "| CartPole-v1 | scripted | exp_name=bc, seed=2 | 1 | 300 | 300.0 | 30.0 |" in result.stdout
    assert "note: exp_name=bc, seed=1 on Pendulum-v1, scripted has no normalized score" in result.stdout
    assert_png(output)


@pytest.mark.parametrize("case", ["empty", "only unfinished", "missing folder", "metric", "group-by", "output"])
def test_bad_input_is_one_error_line(case, runs, tmp_path):
    unfinished = tmp_path / "unfinished"
    (unfinished / "CartPole-v1__bc__scripted__1__1700000000").mkdir(parents=True)
    (tmp_path / "empty").mkdir()
    args, fragment = {
        "empty": ([tmp_path / "empty"], "error: no finished or interrupted run"),
        "only unfinished": ([unfinished], "error: no finished or interrupted run"),
        "missing folder": ([tmp_path / "nowhere"], "is not a folder"),
        "metric": ([runs, "--metric", "score"], "error: --metric score: unknown; choose one of return, normalized"),
        "group-by": ([runs, "--group-by", "exp_nam"], "error: --group-by exp_nam: no run has an argument"),
        "output": ([runs, "--output", tmp_path / "curves.jpeg"], "error: --output"),
    }[case]
    result = plot_runs(args)
    assert_clean_failure(result, fragment, returncode=2)
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not list(tmp_path.rglob("*.png"))


def test_plots_a_real_bc_run(cartpole_dataset, tmp_path):
    trained = run_algorithm(
        "bc",
        ["--dataset", cartpole_dataset, "--total-steps", 40, "--eval-freq", 20, "--eval-episodes", 2, "--seed", 1],
        cwd=tmp_path,
    )
    assert trained.returncode == 0, trained.stderr
    (folder,) = (tmp_path / "runs").iterdir()
    summary = json.loads((folder / "summary.json").read_text())
    result = plot_runs([], cwd=tmp_path)  # the default: runs/ -> runs/curves.png
    assert result.returncode == 0, result.stderr
    assert (
        f"| CartPole-v1 | scripted | bc | 1 | 40 | {summary['final_mean_return']:.1f} | "
        f"{summary['final_normalized_score']:.1f} |"
    ) in result.stdout
    assert "wrote runs/curves.png (1 run, 1 line)" in result.stdout
    assert_png(tmp_path / "runs" / "curves.png")
