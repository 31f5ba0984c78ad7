"""results/make_report.py and results/run_matrix.py: the tables, plots and per-run CSV made from finished runs."""

import csv
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import ROOT, assert_clean_failure, run_script

REPORT = ROOT / "results" / "make_report.py"
BENCHMARK = ROOT / "results" / "benchmark_speed.py"
RUN_MATRIX = ROOT / "results" / "run_matrix.py"

DATASETS_MD = (
    "<!-- made by hand for the test -->\n"
    "| file | env | policy | agent | transitions | episodes | mean return | normalised | random ref. | expert ref. "
    "| collection (s) |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|\n"
    "| `expert.npz` | LunarLander-v3 | expert | `sb3/ppo-LunarLander-v2` | 200,000 | 499 | 244.2 ± 28.3 | 97.8 "
    "| -207.5 | 254.3 | 28 |\n"
)


def load_run_matrix():
    """results/run_matrix.py as a module (results/ is not a package)."""
    spec = importlib.util.spec_from_file_location("run_matrix", ROOT / "results" / "run_matrix.py")
    run_matrix = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_matrix)
    return run_matrix


def write_run(matrix, algorithm, seed, final_return, q_initial, wall_time_s):
    folder = matrix / f"LunarLander-v3__expert__{algorithm}__{seed}"
    folder.mkdir(parents=True)
    evaluations = [
        {
            "step": step,
            "mean_return": final_return,
            "normalized_score": final_return / 2,
            "q_initial": q_initial,
            "discounted_return_initial": 40.0,
        }
        for step in (5000, 10000)
    ]
    summary = {
        "final_mean_return": final_return,
        "final_normalized_score": final_return / 2,
        "total_steps": 10000,
        "updates_per_second": 100.0,
        "evaluations": evaluations,
    }
    record = {
        "env_id": "LunarLander-v3",
        "dataset": "expert",
        "algorithm": algorithm,
        "seed": seed,
        "command": f"python algorithms/x.py --dataset datasets/LunarLander-v3/expert.npz --seed {seed} --threads 1",
        "commit": "0123456789abcdef",
        "wall_time_s": wall_time_s,
        "machine": {"cpu": "Test CPU", "cores": 2},
    }
    (folder / "summary.json").write_text(json.dumps(summary))
    (folder / "run.json").write_text(json.dumps(record))


def test_report_tables_and_plots(tmp_path):
    matrix, readme = tmp_path / "matrix", tmp_path / "README.md"
    write_run(matrix, "CQL", 1, 100.0, 30.0, 60)
    write_run(matrix, "CQL", 2, 200.0, 35.0, 180)
    write_run(matrix, "DQN", 1, -50.0, 90.0, 120)
    (matrix / "datasets.md").write_text(DATASETS_MD)
    readme.write_text(
        "# Mine\n\nhand-written intro\n<!-- report:begin (made by results/make_report.py) -->\nold\n"
        "<!-- report:end -->\nhand-written reading\n"
    )
    result = subprocess.run(
        [sys.executable, REPORT, "--matrix", matrix, "--readme", readme, "--figures", tmp_path / "figs"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    text = readme.read_text()
    assert text.startswith("# Mine\n\nhand-written intro\n")
    assert text.endswith("<!-- report:end -->\nhand-written reading\n")
    assert "\nold\n" not in text
    # mean ± population std over seeds; the best mean in bold; missing seeds and algorithms said so
    # (the columns: CQL, BCQ, IQL, DQN, BC)
    assert "| expert | **150.0 ± 50.0 (2 of 3 seeds)** | – | – | -50.0 (1 of 3 seeds) | – |" in text
    assert "| expert | **75.0 ± 25.0 (2 of 3 seeds)** | – | – | -25.0 (1 of 3 seeds) | – |" in text
    # median wall time 2.0 min from 1.0 to 3.0; the command with the dataset and seed as placeholders
    assert (
        "| CQL | `python algorithms/x.py --dataset datasets/LunarLander-v3/<dataset>.npz --seed <seed> "
        "--threads 1` "
        "| 10,000 | 2.0 (from 1.0 to 3.0) | 100 |" in text
    )
    assert "| 10,000 | 2.0 (1 run) | 100 |" in text  # DQN's single run has no range
    # CQL's flat curves do not climb; one seed of DQN is no check
    assert "| expert | +0.0 | – | – | – | – |" in text
    assert "| `expert.npz` | LunarLander-v3 | expert |" in text
    assert "3 runs finished, 0.1 hours" in text and "Test CPU, 2 cores" in text and "0123456" in text
    for name in ("learning_curves_LunarLander-v3.png", "overestimation_LunarLander-v3.png"):
        assert (tmp_path / "figs" / name).stat().st_size > 10_000
        assert f"(figs/{name})" in text


def test_report_refuses_a_readme_without_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# Results by hand\n")
    result = subprocess.run(
        [sys.executable, REPORT, "--matrix", tmp_path / "none", "--readme", readme, "--figures", tmp_path / "figs"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr and "report markers" in result.stderr
    assert readme.read_text() == "# Results by hand\n"


def test_scalars_csv_keeps_at_most_max_points_per_tag_and_the_last_step(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    run_matrix = load_run_matrix()
    writer = SummaryWriter(tmp_path / "run")
    for step in range(1, 1000):
        writer.add_scalar("losses/td_loss", 1.0 / step, step)
    for step in (5000, 10000):
        writer.add_scalar("eval/episodic_return", step / 100, step)
    writer.close()
    run_matrix.export_scalars(tmp_path / "run", tmp_path / "scalars.csv", max_points=100)
    with (tmp_path / "scalars.csv").open() as file:
        rows = list(csv.DictReader(file))
    loss = [row for row in rows if row["tag"] == "losses/td_loss"]
    assert 90 <= len(loss) <= 101 and loss[0]["step"] == "1" and loss[-1]["step"] == "999"
    assert abs(float(loss[1]["value"]) - 1.0 / int(loss[1]["step"])) < 1e-6  # 6 significant digits
    evaluations = [(row["step"], row["value"]) for row in rows if row["tag"] == "eval/episodic_return"]
    assert evaluations == [("5000", "50"), ("10000", "100")]


def test_datasets_table_keeps_the_rows_of_the_datasets_that_are_missing(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from conftest import cartpole_controller, write_scripted_dataset

    run_matrix = load_run_matrix()
    monkeypatch.setattr(run_matrix, "ROOT", tmp_path)
    monkeypatch.setattr(run_matrix, "MATRIX_DIR", tmp_path / "matrix")
    monkeypatch.setattr(run_matrix, "DATASET_INPUTS", {("CartPole-v1", "a"): (("CartPole-v1", "c"),)})
    (tmp_path / "matrix").mkdir()
    table = tmp_path / "matrix" / "datasets.md"
    header = DATASETS_MD.splitlines()[1:3]
    old = {
        name: f"| `{name}.npz` | CartPole-v1 | scripted | - | {i} | {i} | {i}.0 ± 0.0 | n/a | {i}.0 | {i}.0 | - |"
        for i, name in enumerate("abcd", 1)
    }
    table.write_text("\n".join(["<!-- made by hand -->", *header, *old.values()]) + "\n")
    (tmp_path / "datasets" / "CartPole-v1").mkdir(parents=True)
    write_scripted_dataset(
        tmp_path / "datasets" / "CartPole-v1" / "a.npz", "CartPole-v1", cartpole_controller, 0.0, 300
    )
    runs = [SimpleNamespace(env=SimpleNamespace(env_id="CartPole-v1"), dataset=name) for name in ("b", "a")]

    # a.npz is here: its row is made again from the file. b.npz (a run's) and c.npz (what a.npz is mixed from) are
    # not: their rows are kept, c's before the mix. d.npz is no run's and no mix's: dropped.
    run_matrix.describe_datasets(runs)
    lines = table.read_text().splitlines()
    assert lines[0] == (
        "<!-- made by results/run_matrix.py: python data_collection/describe_datasets.py "
        "datasets/CartPole-v1/b.npz datasets/CartPole-v1/c.npz datasets/CartPole-v1/a.npz -->"
    )
    assert lines[1:3] == header and lines[3:5] == [old["b"], old["c"]] and len(lines) == 6
    assert lines[5].startswith("| `a.npz` | CartPole-v1 | scripted |") and "| 300 |" in lines[5]


def test_a_stopped_matrix_run_resumes_only_while_its_script_is_unchanged(tmp_path, monkeypatch):
    from types import SimpleNamespace

    run_matrix = load_run_matrix()
    monkeypatch.setattr(run_matrix, "ROOT", tmp_path)

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
            cwd=tmp_path,
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()

    git("init", "-q")
    (tmp_path / "algorithms").mkdir()
    for name in ("x.py", "y.py"):
        (tmp_path / "algorithms" / name).write_text("print(1)\n")
    git("add", ".")
    git("commit", "-qm", "first")
    first = git("rev-parse", "HEAD")
    run = SimpleNamespace(command=["python", "algorithms/x.py", "--seed", "1"])
    log = tmp_path / "x.log"
    log.write_text(
        f"# commit {first}\n$ python algorithms/x.py --seed 1\nx: 9 transitions, run folder runs/r1 (resumed)\n"
    )
    assert run_matrix.resumable_folder(run, log, first) is None  # no checkpoint: it starts again
    (tmp_path / "runs" / "r1").mkdir(parents=True)
    (tmp_path / "runs" / "r1" / "checkpoint.pt").write_bytes(b"")
    assert run_matrix.resumable_folder(run, log, first) == tmp_path / "runs" / "r1"
    (tmp_path / "algorithms" / "y.py").write_text("print(2)\n")
    git("commit", "-qam", "another script")
    assert run_matrix.resumable_folder(run, log, git("rev-parse", "HEAD")) == tmp_path / "runs" / "r1"
    (tmp_path / "algorithms" / "x.py").write_text("print(2)\n")
    git("commit", "-qam", "this script")
    assert run_matrix.resumable_folder(run, log, git("rev-parse", "HEAD")) is None
    assert run_matrix.resumable_folder(run, tmp_path / "no.log", first) is None


def test_benchmark_and_matrix_refuse_bad_input_with_exit_2(tmp_path):
    """Checked before any measuring or run: one line, exit status 2, as the algorithm scripts do."""
    for script, flags, fragment in (
        (BENCHMARK, ["--only", "nothing"], "no case's name starts with any of ['nothing']"),
        (BENCHMARK, ["--repeats", "0"], "--repeats and every --threads must be at least 1"),
        (BENCHMARK, ["--hf-cache", tmp_path / "none"], "is not a folder"),
        (RUN_MATRIX, ["--jobs", "0"], "--jobs must be at least 1, got 0"),
    ):
        result = run_script(script, flags, dict(os.environ))
        assert_clean_failure(result, fragment, returncode=2)
        assert "creating" not in result.stdout  # no d3rlpy venv was made


def test_benchmark_takes_the_hub_cache_from_the_hugging_face_variables(tmp_path):
    code = "import benchmark_speed; print(benchmark_speed.hub_cache(None))"
    clean = {key: value for key, value in os.environ.items() if key not in ("HF_HUB_CACHE", "HF_HOME")}
    for variables, expected in (
        ({"HF_HUB_CACHE": str(tmp_path / "cache")}, tmp_path / "cache"),
        ({"HF_HOME": str(tmp_path / "home")}, tmp_path / "home" / "hub"),
    ):
        result = subprocess.run(
            [sys.executable, "-c", code],
            cwd=ROOT / "results",
            env={**clean, **variables},
            capture_output=True,
            text=True,
        )
        assert result.returncode == 0, result.stderr
        assert Path(result.stdout.strip()) == expected


def tiny_matrix(run_matrix, root: Path, dataset: Path, monkeypatch) -> None:
    """A git checkout at root holding bc.py and one CartPole dataset, and a matrix of 200-step BC runs on it."""
    import shutil

    (root / "algorithms").mkdir(parents=True)
    shutil.copy(ROOT / "algorithms" / "bc.py", root / "algorithms" / "bc.py")
    (root / "datasets" / "CartPole-v1").mkdir(parents=True)
    shutil.copy(dataset, root / "datasets" / "CartPole-v1" / "scripted.npz")
    for command in (["init", "-q"], ["add", "algorithms"], ["commit", "-qm", "bc"]):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *command], cwd=root, check=True)
    tiny = run_matrix.Algorithm(
        "BC", "algorithms/bc.py", ("--total-steps", "200", "--eval-freq", "100", "--eval-episodes", "2"), minutes=1
    )
    monkeypatch.setattr(run_matrix, "ROOT", root)
    monkeypatch.setattr(run_matrix, "MATRIX_DIR", root / "results" / "matrix")
    monkeypatch.setattr(run_matrix, "MATRIX", (run_matrix.EnvRows("CartPole-v1", ("scripted",), (tiny,)),))


def test_matrix_runs_as_ray_tasks_and_writes_the_same_records(cartpole_dataset, tmp_path, monkeypatch, capsys):
    """--backend ray on a Ray instance started for the test: a tiny matrix of two BC runs, each a Ray task,
    leaves the records a local run leaves (summary.json, run.json, scalars.csv), and a second start skips them."""
    import ray

    run_matrix = load_run_matrix()
    root = tmp_path / "repo"
    tiny_matrix(run_matrix, root, cartpole_dataset, monkeypatch)
    monkeypatch.setattr(run_matrix, "SEEDS", (1, 2))
    try:
        run_matrix.main(run_matrix.Args(backend="ray", jobs=2))
    finally:
        ray.shutdown()
    assert "CPUs in the cluster, one per run" in capsys.readouterr().out
    fingerprint = run_matrix.dataset_fingerprint(root / "datasets" / "CartPole-v1" / "scripted.npz")
    for seed in (1, 2):
        record = root / "results" / "matrix" / f"CartPole-v1__scripted__BC__{seed}"
        summary = json.loads((record / "summary.json").read_text())
        run = json.loads((record / "run.json").read_text())
        assert summary["steps_done"] == 200 and summary["args"]["seed"] == seed
        assert run["command"].startswith("python algorithms/bc.py --dataset datasets/CartPole-v1/scripted.npz")
        assert run["dataset_sha256"] == fingerprint
        with (record / "scalars.csv").open() as file:
            assert "eval/episodic_return" in {row["tag"] for row in csv.DictReader(file)}
    run_matrix.main(run_matrix.Args(backend="ray", jobs=2))  # all done: it starts nothing, and needs no Ray
    assert "0 to run" in capsys.readouterr().out


def test_matrix_refuses_a_dataset_other_than_its_finished_runs_used(cartpole_dataset, tmp_path, monkeypatch, capsys):
    """A dataset built again into other data (another machine, another version) would mix two datasets in one
    cell: the runner refuses it with one line and exit 2; the metadata's collection time is no change."""
    import pytest
    from conftest import cartpole_controller, write_scripted_dataset
    from dataset_io import load_dataset, save_dataset

    run_matrix = load_run_matrix()
    root = tmp_path / "repo"
    tiny_matrix(run_matrix, root, cartpole_dataset, monkeypatch)
    monkeypatch.setattr(run_matrix, "SEEDS", (1,))
    run_matrix.main(run_matrix.Args(jobs=1))
    dataset = root / "datasets" / "CartPole-v1" / "scripted.npz"
    first = run_matrix.dataset_fingerprint(dataset)
    arrays, metadata = load_dataset(dataset)
    save_dataset(dataset, arrays, {**metadata, "collection_seconds": 1.0}, overwrite=True)
    assert run_matrix.dataset_fingerprint(dataset) == first
    write_scripted_dataset(dataset, "CartPole-v1", cartpole_controller, random_action_prob=0.2, num_transitions=5000)
    monkeypatch.setattr(run_matrix, "SEEDS", (1, 2))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_matrix.main(run_matrix.Args(jobs=1))
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("error: datasets/CartPole-v1/scripted.npz is not the file that the finished runs on it")
    assert first[:12] in error and error.count("\n") == 1
    assert not (root / "results" / "matrix" / "CartPole-v1__scripted__BC__2").exists()


def write_hopper_runs(matrix: Path) -> None:
    """Every Hopper dataset and seed for BC, TD3+BC, CQL and SAC: TD3+BC scores well above BC on medium-expert,
    CQL ends below its real return, SAC above it."""
    base = {"BC": 50.0, "TD3+BC": 80.0, "CQL": 60.0, "SAC": 5.0}
    for dataset_index, dataset in enumerate(("random", "medium", "expert", "medium-expert", "medium-expert-sampled")):
        for label, score in base.items():
            for seed in (1, 2, 3):
                final = score + dataset_index + seed
                curve = {10000: 40.0, 20000: final} if label == "SAC" else {10000: final / 2, 20000: final}
                evaluations = [
                    {
                        "step": step,
                        "mean_return": 30 * final,
                        "normalized_score": curve[step],
                        "q_initial": {"CQL": 50.0, "SAC": 5000.0}.get(label, 0.0),
                        "discounted_return_initial": 100.0,
                        "wall_time_s": 60.0 * step / 1000,
                    }
                    for step in (10000, 20000)
                ]
                folder = matrix / f"Hopper-v5__{dataset}__{label}__{seed}"
                folder.mkdir(parents=True)
                summary = {
                    "final_mean_return": 30 * final,
                    "final_normalized_score": final,
                    "total_steps": 20000,
                    "updates_per_second": 100.0,
                    "evaluations": evaluations,
                }
                record = {
                    "env_id": "Hopper-v5",
                    "dataset": dataset,
                    "algorithm": label,
                    "seed": seed,
                    "command": f"python algorithms/x.py --dataset datasets/Hopper-v5/{dataset}.npz "
                    f"--seed {seed} --threads 1",
                    "commit": "0123456789abcdef",
                    "wall_time_s": 1200.0,
                    "machine": {"cpu": "Test CPU", "cores": 2},
                }
                (folder / "summary.json").write_text(json.dumps(summary))
                (folder / "run.json").write_text(json.dumps(record))


def test_report_aggregates_with_rliable_checks_the_claims_and_plots_compute(tmp_path):
    matrix, readme = tmp_path / "matrix", tmp_path / "README.md"
    write_hopper_runs(matrix)
    shutil.rmtree(matrix / "Hopper-v5__medium-expert-sampled__SAC__3")  # a cell still running: left out of the IQM
    for seed in (1, 2, 3):  # 10%BC has run on one dataset only (and, as BC, logs no Q(s0)): it waits, the rest count
        source = matrix / f"Hopper-v5__medium-expert-sampled__BC__{seed}"
        folder = matrix / f"Hopper-v5__medium-expert-sampled__10%BC__{seed}"
        folder.mkdir()
        summary = json.loads((source / "summary.json").read_text())
        for evaluation in summary["evaluations"]:
            del evaluation["q_initial"]
        (folder / "summary.json").write_text(json.dumps(summary))
        record = {**json.loads((source / "run.json").read_text()), "algorithm": "10%BC"}
        (folder / "run.json").write_text(json.dumps(record))
    readme.write_text("<!-- report:begin (made by results/make_report.py) -->\n<!-- report:end -->\n")
    result = subprocess.run(
        [sys.executable, REPORT, "--matrix", matrix, "--readme", readme, "--figures", tmp_path / "figs"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    text = readme.read_text()
    # SAC lacks a seed on medium-expert-sampled, so the aggregates count the first four datasets. TD3+BC's 12 scores
    # there are 81..86 (seed + dataset), so its IQM is the mean of the middle six (83, 83, 83, 84, 84, 84); every
    # run of it beats every run of BC (51..56), so P(TD3+BC > BC) is 1 in [1, 1].
    rows = {line.split(" | ")[1]: line for line in text.splitlines() if line.startswith("| Hopper-v5 | ")}
    assert rows["TD3+BC"].startswith("| Hopper-v5 | TD3+BC | 83.5 [") and rows["TD3+BC"].endswith(
        "| 1.00 [1.00, 1.00] |"
    )
    assert rows["BC"].endswith("| – |") and rows["SAC"].endswith("| 0.00 [0.00, 0.00] |")
    assert "| CQL stays below its real return on Hopper-v5 medium-expert | Q(s0) 50 vs real 100.0" in text
    assert (
        "| SAC over-estimates and ends below BC and the data on Hopper-v5 medium | Q(s0) 5000 vs real 100.0; "
        "ends at 8.0, BC at 53.0 (mean of 3 seeds' last evaluation) | holds |" in text
    )
    # SAC (5 + 0 + seed) does not beat BC (50 + 0 + seed) on random: the one claim here that fails.
    assert (
        "| SAC beats BC on Hopper-v5 random, where the data holds every action | ends at 7.0, BC at 52.0 (mean of "
        "3 seeds' last evaluation) | **fails** |" in text
    )
    assert text.count("**fails**") == 1
    # each run climbs from half its final score to its final score (base + dataset index + seed), so on random the
    # three seeds gain half of base + 1, + 2, + 3: far above twice their standard error. SAC falls from 40 to
    # 5 + seed. (Columns: CQL, BCQ, TD3+BC, IQL, SAC, BC, 10%BC.)
    assert "| random | **+31.0 climbing** | – | **+41.0 climbing** | – | -33.0 | **+26.0 climbing** | – |" in text
    assert (
        "| the best offline method beats BC outside the 95% intervals on Hopper-v5 medium-expert | TD3+BC 85.0 ["
        in text
    )
    assert "| the best offline method beats BC on BipedalWalker-v3 noisy | not every seed has run | – |" in text
    assert (
        "| the best offline method beats BC outside the 95% intervals on Hopper-v5 medium-expert-sampled | "
        "TD3+BC 86.0 [85.0, 87.0] vs BC 56.0 [55.0, 57.0]; 10%BC 56.0 [55.0, 57.0] | holds |" in text
    )
    assert "| the best offline method beats BC on BipedalWalker-v3 ppo-a2c-sampled | not every seed has run |" in text
    assert (
        "Datasets counted: Hopper-v5: random, medium, expert, medium-expert (not yet medium-expert-sampled, where "
        "not every algorithm and seed has run), without 10%BC, not yet run on all of them." in text
    )
    assert "population std" in text
    assert "evaluation), on Test CPU (a faster CPU moves a line to the left)" in text
    for name in ("performance_profiles.png", "compute.png"):
        assert (tmp_path / "figs" / name).stat().st_size > 10_000
        assert f"(figs/{name})" in text


def load_check_reuse():
    """results/check_reuse.py as a module (it imports run_matrix from its own folder)."""
    spec = importlib.util.spec_from_file_location("check_reuse", ROOT / "results" / "check_reuse.py")
    check_reuse = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check_reuse)
    return check_reuse


def test_reuse_check_compares_the_numbers_an_earlier_version_logged():
    same = load_check_reuse().same_evaluations
    before = [{"step": 150, "mean_return": -490.3, "q_initial": 1.5, "wall_time_s": 4.0}]
    # Fields added since (the per-episode returns) and another machine's wall time are not changed numbers.
    assert same(
        before,
        [{"step": 150, "mean_return": -490.3, "q_initial": 1.5, "returns": [-400.1, -580.5], "wall_time_s": 9.0}],
    )
    assert not same(before, [{"step": 150, "mean_return": -490.2, "q_initial": 1.5}])  # a changed number
    assert not same(before, [{"step": 150, "mean_return": -490.3}])  # a field no longer logged
    assert not same(before, before * 2)  # another number of evaluations


def test_reuse_check_finds_the_committed_script_computes_what_the_working_tree_does(cartpole_dataset):
    """A seeded short run of algorithms/bc.py at HEAD and in the working tree: the same evaluations and tensors."""
    check_reuse = load_check_reuse()
    command = ["python", "algorithms/bc.py", "--dataset", str(cartpole_dataset), "--seed", "1", "--threads", "1"]
    same, how = check_reuse.same_numbers("algorithms/bc.py", "HEAD", command)
    assert same, how
    assert how.startswith("2 evaluations and ")


def test_matrix_builds_the_missing_datasets_with_their_commands(cartpole_dataset, tmp_path, monkeypatch, capsys):
    """--build-datasets runs each missing dataset's command from the repository root, the datasets a mix reads
    first; without it the runner names the flag and stops with exit 2."""
    import shutil

    import pytest
    from dataset_io import load_dataset

    run_matrix = load_run_matrix()
    root = tmp_path / "repo"
    tiny_matrix(run_matrix, root, cartpole_dataset, monkeypatch)
    shutil.copytree(ROOT / "data_collection", root / "data_collection", ignore=shutil.ignore_patterns("__pycache__"))
    collect = (
        "python data_collection/collect_dataset.py --env-id CartPole-v1 --policy random --num-transitions 600 "
        "--reference-episodes 2"
    )
    monkeypatch.setattr(
        run_matrix,
        "DATASET_COMMANDS",
        {
            ("CartPole-v1", "random"): collect,
            ("CartPole-v1", "random1"): f"{collect} --seed 1 --output datasets/CartPole-v1/random1.npz",
            ("CartPole-v1", "mix"): "python data_collection/mix_datasets.py datasets/CartPole-v1/random.npz "
            "datasets/CartPole-v1/random1.npz --output datasets/CartPole-v1/mix.npz",
        },
    )
    monkeypatch.setattr(
        run_matrix, "DATASET_INPUTS", {("CartPole-v1", "mix"): (("CartPole-v1", "random"), ("CartPole-v1", "random1"))}
    )
    tiny = run_matrix.MATRIX[0].algorithms
    monkeypatch.setattr(run_matrix, "MATRIX", (run_matrix.EnvRows("CartPole-v1", ("mix",), tiny),))
    monkeypatch.setattr(run_matrix, "SEEDS", (1,))
    with pytest.raises(SystemExit) as exit_info:
        run_matrix.main(run_matrix.Args(jobs=1))
    assert exit_info.value.code == 2 and "--build-datasets" in capsys.readouterr().err
    run_matrix.main(run_matrix.Args(jobs=1, build_datasets=True))
    out = capsys.readouterr().out
    assert (
        out.index("build CartPole-v1/random:")
        < out.index("build CartPole-v1/random1:")
        < out.index("build CartPole-v1/mix:")
    )
    arrays, _ = load_dataset(root / "datasets" / "CartPole-v1" / "mix.npz")
    assert len(arrays["rewards"]) == 1200
    assert (root / "results" / "matrix" / "CartPole-v1__mix__BC__1" / "run.json").exists()
    assert "`mix.npz`" in (root / "results" / "matrix" / "datasets.md").read_text()

    run_matrix.DATASET_COMMANDS[("CartPole-v1", "other")] = f"{collect} --env-id NoSuchEnv-v0"
    monkeypatch.setattr(run_matrix, "MATRIX", (run_matrix.EnvRows("CartPole-v1", ("other",), tiny),))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_matrix.main(run_matrix.Args(jobs=2, build_datasets=True))
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and error.startswith("error: building CartPole-v1/other failed: ")
    assert "NoSuchEnv-v0" in error and error.count("\n") == 1


def write_coverage_run(coverage, dataset, algorithm, seed, score):
    folder = coverage / f"Hopper-v5__{dataset}__{algorithm}__{seed}"
    folder.mkdir(parents=True)
    summary = {"final_normalized_score": score, "evaluations": [{"step": 100, "normalized_score": score}]}
    if algorithm == "10%BC":
        summary |= {"kept_episodes": 42, "kept_transitions": 41952, "kept_mean_return": 3679.4}
    record = {"env_id": "Hopper-v5", "dataset": dataset, "algorithm": algorithm, "seed": seed, "commit": "abcdef0123"}
    (folder / "summary.json").write_text(json.dumps(summary))
    (folder / "run.json").write_text(json.dumps(record | {"wall_time_s": 360.0}))


def test_coverage_section_scores_each_dataset_kind_and_checks_the_claim(tmp_path):
    coverage, readme = tmp_path / "coverage", tmp_path / "README.md"
    scores = {"TD3+BC": (100.0, 102.0, 104.0), "BC": (30.0, 33.0, 36.0), "10%BC": (90.0, 90.0, 90.0)}
    for seed_index, seed in enumerate((4, 5, 6)):
        for label, values in scores.items():
            write_coverage_run(coverage, "ppo-tqc-sampled", label, seed, values[seed_index])
            write_coverage_run(coverage, "ppo-tqc", label, seed, 50.0 if label == "TD3+BC" else values[seed_index])
    readme.write_text(
        "<!-- report:begin (made by results/make_report.py) -->\n<!-- report:end -->\nreading\n"
        "<!-- coverage:begin (made by results/make_report.py) -->\nold\n<!-- coverage:end -->\nend\n"
    )
    result = subprocess.run(
        [
            sys.executable,
            REPORT,
            "--matrix",
            tmp_path / "none",
            "--coverage",
            coverage,
            "--readme",
            readme,
            "--figures",
            tmp_path / "figs",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    text = readme.read_text()
    assert "\nold\n" not in text and text.endswith("<!-- coverage:end -->\nend\n")
    # the columns TD3+BC, BC, 10%BC, IQL (no IQL run: a dash); a constant cell has a zero-width interval
    assert "| ppo-tqc-sampled | – | 102.0 [100.0, 104.0] | 33.0 [30.0, 36.0] | 90.0 [90.0, 90.0] | – |" in text
    assert (
        "| the best offline method beats BC outside the 95% intervals on Hopper-v5 ppo-tqc-sampled | "
        "TD3+BC 102.0 [100.0, 104.0] vs BC 33.0 [30.0, 36.0]; 10%BC 90.0 [90.0, 90.0] | holds |" in text
    )
    assert "on Hopper-v5 ppo-tqc | TD3+BC 50.0 [50.0, 50.0] vs BC 33.0 [30.0, 36.0]" in text
    assert "ppo-tqc: 42 episodes, 41,952 transitions, mean return 3679" in text
    assert (tmp_path / "figs" / "coverage.png").stat().st_size > 10_000 and "(figs/coverage.png)" in text


def test_coverage_grid_has_its_own_seeds_records_and_filtered_bc():
    result = subprocess.run(
        [sys.executable, RUN_MATRIX, "--grid", "coverage", "--list"], capture_output=True, text=True, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr
    keys = [line.split()[1] for line in result.stdout.splitlines()[:-1]]
    assert len(keys) == 24 and result.stdout.splitlines()[-1].endswith("of 24 done")
    assert {key.split("__")[1] for key in keys} == {"ppo-tqc", "ppo-tqc-sampled"}
    assert {key.split("__")[2] for key in keys} == {"TD3+BC", "BC", "10%BC", "IQL"}
    assert {key.split("__")[3] for key in keys} == {"4", "5", "6"}  # never the matrix's seeds 1-3
    assert (
        "python algorithms/bc.py --dataset datasets/Hopper-v5/ppo-tqc-sampled.npz --seed 6 --threads 1 "
        "--top-fraction 0.1 --exp-name bc_top10" in result.stdout
    )
