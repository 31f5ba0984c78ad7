"""Every algorithm script: bad datasets and bad flags get one line and exit status 2, nothing half-written is left,
Ctrl-C keeps what was learned, --resume continues bit-identically, and two runs never share a run folder."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from dataclasses import fields
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import numpy as np
import pytest
import torch
from conftest import ALGORITHMS, assert_clean_failure, load_algorithm, load_npz, run_algorithm
from dataset_io import save_dataset

# Each script with the data it takes and flags that make it small; the run is 300 steps, evaluated every 100.
SCRIPTS = {
    "bc": ("pendulum_dataset", ["--hidden-dim", 32]),
    "bcq_continuous": ("pendulum_dataset", []),
    "cql_sac_continuous": ("pendulum_dataset", ["--num-random", 2, "--hidden-dim", 32]),
    "td3_bc": ("pendulum_dataset", ["--hidden-dim", 32]),
    "iql": ("pendulum_dataset", ["--hidden-dim", 32]),
    "cql_discrete_lunarlander": ("cartpole_dataset", ["--hidden-dim", 32]),
    "bcq_discrete": ("cartpole_dataset", ["--hidden-dim", 32]),
}
BOX_SCRIPTS = [name for name, (dataset, _) in SCRIPTS.items() if dataset == "pendulum_dataset"]
SHORT = ["--total-steps", 300, "--eval-freq", 100, "--eval-episodes", 2, "--log-freq", 50, "--seed", 5]
TINY = ["--total-steps", 20, "--eval-freq", 20, "--eval-episodes", 2, "--seed", 5]


def dataset_of(script: str, request) -> "os.PathLike":
    return request.getfixturevalue(SCRIPTS[script][0])


def command(script: str, dataset, *extra, flags=SHORT) -> list[str]:
    return [
        sys.executable,
        str(ALGORITHMS / f"{script}.py"),
        "--dataset",
        str(dataset),
        *map(str, flags),
        *map(str, SCRIPTS[script][1]),
        *map(str, extra),
    ]


def start(script: str, dataset, cwd, *extra, flags=SHORT) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        command(script, dataset, *extra, flags=flags),
        cwd=cwd,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def finish(process: subprocess.Popen) -> subprocess.CompletedProcess:
    stdout, stderr = process.communicate(timeout=600)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def assert_nothing_written(cwd) -> None:
    leftovers = [path for path in cwd.rglob("*") if path.name.startswith(".") or "runs" in path.parts]
    assert not leftovers, leftovers


def results_of(run_dir) -> tuple[list, dict]:
    """The evaluations of summary.json without their wall times, and the saved model's tensors."""
    summary = json.loads((run_dir / "summary.json").read_text())
    model = torch.load(next(run_dir.glob(f"{summary['args']['exp_name']}.pt")), weights_only=True)
    return [{key: value for key, value in e.items() if key != "wall_time_s"} for e in summary["evaluations"]], model


def assert_same_results(first, second) -> None:
    (evaluations, model), (other_evaluations, other_model) = results_of(first), results_of(second)
    assert evaluations == other_evaluations
    assert model.keys() == other_model.keys() and all(torch.equal(model[key], other_model[key]) for key in model)


# --------------------------------------------------------------------------------------------- bad datasets
def write_damaged(kind: str, source, path) -> None:
    arrays, metadata = load_npz(source)
    contents = {**arrays, "metadata": np.array(json.dumps(metadata))}
    if kind == "truncated":
        data = source.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "random-bytes":
        path.write_bytes(np.random.default_rng(0).bytes(5000))
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "bad-crc":
        np.savez(path, **contents)  # uncompressed, so a flipped byte reaches the CRC check, not zlib
        with zipfile.ZipFile(path) as archive:
            info = archive.getinfo("rewards.npy")
        data = bytearray(path.read_bytes())
        data[info.header_offset + 30 + len(info.filename) + 200] ^= 0xFF
        path.write_bytes(bytes(data))
    elif kind == "object-array":
        np.savez(path, **{**contents, "observations": np.array([{"a": 1}] * len(arrays["rewards"]), dtype=object)})
    elif kind == "metadata-not-json":
        np.savez(path, **{**contents, "metadata": np.array("{env_id: Pendulum")})
    elif kind == "metadata-a-list":
        np.savez(path, **{**contents, "metadata": np.array(json.dumps([metadata]))})
    elif kind == "no-metadata":
        np.savez(path, **arrays)
    elif kind == "observations-as-text":
        np.savez(path, **{**contents, "observations": arrays["observations"].astype(str)})


DAMAGES = {
    "truncated": "cannot read",
    "random-bytes": "it is not a .npz file",
    "empty": "cannot read",
    "bad-crc": "cannot read",
    "object-array": "holds Python objects",
    "metadata-not-json": "cannot read",
    "metadata-a-list": "not a JSON object",
    "no-metadata": "no metadata",
    "observations-as-text": "not numbers",
}


@pytest.fixture(scope="module")
def modules():
    return {script: load_algorithm(script) for script in SCRIPTS}


def one_error_line(capsys, call) -> str:
    """Run `call` in this process: it must stop with exit status 2 and one line on stderr, which is returned."""
    capsys.readouterr()  # what the fixtures printed
    with pytest.raises(SystemExit) as stop:
        call()
    assert stop.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("kind", DAMAGES)
def test_damaged_dataset_is_one_line(script, kind, modules, request, tmp_path, capsys):
    path = tmp_path / "damaged.npz"
    write_damaged(kind, dataset_of(script, request), path)
    line = one_error_line(capsys, lambda: modules[script].load_dataset(str(path), torch.device("cpu")))
    assert str(path) in line and DAMAGES[kind] in line and "pickle" not in line


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize(
    ("key", "value"), [("rewards", np.nan), ("observations", np.inf), ("next_observations", -np.inf)]
)
def test_non_finite_values_are_refused_at_load(script, key, value, modules, request, tmp_path, capsys):
    arrays, metadata = load_npz(dataset_of(script, request))
    key = "observations" if script == "bc" else key  # behaviour cloning reads observations and actions only
    arrays[key].reshape(len(arrays[key]), -1)[7, 0] = value  # one value
    save_dataset(tmp_path / "bad.npz", arrays, metadata, overwrite=True)
    path = str(tmp_path / "bad.npz")
    line = one_error_line(capsys, lambda: modules[script].load_dataset(path, torch.device("cpu")))
    assert f"{key} hold 1 NaN or infinite" in line and "learning-rate" not in line


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_bad_dataset_stops_a_real_run_cleanly(script, request, tmp_path):
    (tmp_path / "data").mkdir()
    write_damaged("random-bytes", dataset_of(script, request), tmp_path / "data" / "damaged.npz")
    result = run_algorithm(script, ["--dataset", tmp_path / "data" / "damaged.npz"], cwd=tmp_path)
    assert_clean_failure(result, "it is not a .npz file", returncode=2)
    assert len(result.stderr.strip().splitlines()) == 1
    assert_nothing_written(tmp_path)


@pytest.mark.parametrize("script", BOX_SCRIPTS)
def test_actions_outside_the_bounds_are_refused_unless_clipped(script, request, tmp_path):
    arrays, metadata = load_npz(dataset_of(script, request))
    arrays["actions"] *= 10.0
    save_dataset(tmp_path / "wide.npz", arrays, metadata, overwrite=True)
    result = run_algorithm(script, ["--dataset", tmp_path / "wide.npz"], cwd=tmp_path)
    assert_clean_failure(result, "outside the env's bounds", "[[-2.0], [2.0]]", "--clip-actions", returncode=2)
    assert not (tmp_path / "runs").exists()
    clipped = run_algorithm(
        script, ["--dataset", tmp_path / "wide.npz", "--clip-actions", *TINY, *SCRIPTS[script][1]], cwd=tmp_path
    )
    assert clipped.returncode == 0, clipped.stderr


def write_degenerate(source, path) -> None:
    """Every degenerate property at once: observations that never change, a single action value, zero rewards, and
    no complete episode (no termination, no truncation), so that nothing divides by a spread of zero."""
    arrays, metadata = load_npz(source)
    arrays["observations"][:] = arrays["observations"][0]
    arrays["next_observations"][:] = arrays["observations"][0]
    arrays["actions"][:] = arrays["actions"][0]
    arrays["rewards"][:] = 0.0
    arrays["terminations"][:] = False
    arrays["truncations"][:] = False
    arrays["episode_returns"] = np.zeros(0, dtype=np.float32)
    save_dataset(path, arrays, metadata, overwrite=True)


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_degenerate_dataset_makes_a_run_with_finite_results(script, request, tmp_path):
    write_degenerate(dataset_of(script, request), tmp_path / "flat.npz")
    result = run_algorithm(script, ["--dataset", tmp_path / "flat.npz", *TINY, *SCRIPTS[script][1]], cwd=tmp_path)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    (run_dir,) = (tmp_path / "runs").iterdir()
    summary = json.loads((run_dir / "summary.json").read_text(), parse_constant=lambda name: pytest.fail(name))
    assert summary["status"] == "finished" and np.isfinite(summary["final_returns"]).all()


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_single_transition_is_refused_before_anything_is_written(script, modules, request, tmp_path, capsys):
    arrays, metadata = load_npz(dataset_of(script, request))
    save_dataset(tmp_path / "one.npz", {key: value[:1] for key, value in arrays.items()}, metadata, overwrite=True)
    line = one_error_line(capsys, lambda: modules[script].load_dataset(str(tmp_path / "one.npz"), torch.device("cpu")))
    assert "holds 1 transition" in line and "at least 2" in line


METADATA_DAMAGES = {
    "env_id": (5, "not the name of an env"),
    "reference_returns": (5, "not {'random': number, 'expert': number}"),
    "action_space": ([1, 2], "not a JSON object"),
}


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("key", [*METADATA_DAMAGES, "bounds-as-text"])
def test_metadata_of_the_wrong_kind_is_one_line(script, key, modules, request, tmp_path, capsys):
    arrays, metadata = load_npz(dataset_of(script, request))
    value, expected = METADATA_DAMAGES.get(key, (None, None))
    if key == "bounds-as-text":
        key, value, expected = "action_space", {**metadata["action_space"], "high": "2"}, "not a list of numbers"
    contents = {**arrays, "metadata": np.array(json.dumps({**metadata, key: value}))}
    np.savez(tmp_path / "odd.npz", **contents)
    line = one_error_line(capsys, lambda: modules[script].load_dataset(str(tmp_path / "odd.npz"), torch.device("cpu")))
    assert expected in line, line


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("references", [{"random": 5.0, "expert": 5.0}, {"random": None, "expert": 9.0}, None])
def test_reference_returns_without_a_scale_leave_the_score_empty(script, references, modules):
    class Left(torch.nn.Module):
        def forward(self, observations):
            return torch.zeros(len(observations), dtype=torch.long)

    how = ("CartPole-v1", 1, 0, 0.99, torch.device("cpu"), references)
    record = modules[script].evaluate(Left(), None, *how)
    assert record["normalized_score"] is None and record["mean_return"] > 0


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_folder_given_as_dataset_is_named_a_folder(script, modules, request, capsys):
    folder = Path(dataset_of(script, request)).parent
    line = one_error_line(capsys, lambda: modules[script].load_dataset(str(folder), torch.device("cpu")))
    assert "is a folder" in line and "scripted.npz" in line and "does not exist" not in line


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_non_finite_evaluation_stops_in_one_line(script, modules, monkeypatch, capsys):
    module = modules[script]
    monkeypatch.setattr(module, "evaluate", lambda *args, **kwargs: {"mean_return": float("nan"), "q_initial": 1.0})
    run = SimpleNamespace(args=module.Args(), metadata={}, run_dir=Path("runs/none"), acting=None, q_initial=None)
    run.env_id, run.device, run.eval_time = "CartPole-v1", torch.device("cpu"), 0.0
    line = one_error_line(capsys, lambda: module.Run.evaluate(run, 100))
    assert "at gradient step 100" in line and "NaN or infinite" in line


@pytest.mark.parametrize("script", BOX_SCRIPTS)
def test_mujoco_deprecations_are_quiet_and_leave_no_log_file(script, modules, tmp_path, monkeypatch, capfd):
    import gymnasium as gym

    monkeypatch.chdir(tmp_path)
    modules[script].quiet_mujoco_deprecations("HalfCheetah-v5")
    gym.make("HalfCheetah-v5").close()
    assert "settotalmass" not in capfd.readouterr().err and not (tmp_path / "MUJOCO_LOG.TXT").exists()


# --------------------------------------------------------------------------------------------- bad flags
BAD_FLAGS = [
    {"batch_size": 0},
    {"batch_size": -1},
    {"log_freq": 0},
    {"total_steps": 0},
    {"eval_freq": -5},
    {"eval_episodes": 0},
    {"gamma": 1.5},
    {"gamma": float("nan")},
    {"seed": -1},
    {"hidden_dim": 0},
]


def has_field(script: str, name: str) -> bool:
    return f"\n    {name}: " in (ALGORITHMS / f"{script}.py").read_text()


def flag_id(value) -> str:
    return value if isinstance(value, str) else "-".join(f"{key}={number}" for key, number in value.items())


@pytest.mark.parametrize(
    ("script", "bad"),
    [(script, bad) for script in SCRIPTS for bad in BAD_FLAGS if has_field(script, next(iter(bad)))],
    ids=flag_id,
)
def test_bad_numbers_in_flags_are_one_line(script, bad, modules, capsys):
    module = modules[script]
    line = one_error_line(capsys, lambda: module.validate_args(module.Args(**bad)))
    assert f"--{next(iter(bad)).replace('_', '-')}" in line


@pytest.mark.parametrize("script", SCRIPTS)
def test_rates_out_of_range_are_one_line(script, modules, capsys):
    module = modules[script]
    rates = [
        field for field in module.Args.__dataclass_fields__ if field.endswith("lr") or field in ("learning_rate", "tau")
    ]
    assert rates
    for field in rates:
        for value in (0.0, -1e-3, float("nan")):
            assert f"--{field.replace('_', '-')}" in one_error_line(
                capsys, lambda: module.validate_args(module.Args(**{field: value}))
            )


@pytest.mark.parametrize("script", SCRIPTS)
def test_bad_flags_stop_a_real_run_before_any_run_folder(script, request, tmp_path):
    result = run_algorithm(script, ["--dataset", dataset_of(script, request), "--batch-size", -1], cwd=tmp_path)
    assert_clean_failure(result, "--batch-size", returncode=2)
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("script", SCRIPTS)
def test_fewer_steps_than_log_freq_give_strict_json(script, request, tmp_path):
    result = run_algorithm(
        script, ["--dataset", dataset_of(script, request), *TINY, *SCRIPTS[script][1], "--log-freq", 100], cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    (run_dir,) = (tmp_path / "runs").iterdir()
    summary = json.loads((run_dir / "summary.json").read_text(), parse_constant=lambda name: pytest.fail(name))
    assert summary["status"] == "finished" and np.isfinite(summary["final_returns"]).all()


# --------------------------------------------------------------------------------------------- every numeric flag
NUMBERS = (int, float, Optional[int], Optional[float])


def numeric_flags(module) -> list[str]:
    return [f"--{field.name.replace('_', '-')}" for field in fields(module.Args) if field.type in NUMBERS]


def accepted_values(module, capsys) -> dict[str, list[str]]:
    """Each numeric flag's values among NaN, +-infinity, 0 and -1 that read_flags() accepts, after asserting that
    NaN and infinity are refused everywhere, and every refusal is one line that names the flag, with exit status 2."""
    accepted = {}
    for flag in numeric_flags(module):
        for value in ("nan", "inf", "-inf", "0", "-1"):
            capsys.readouterr()
            try:
                module.read_flags([flag, value])
            except SystemExit as stop:
                lines = capsys.readouterr().err.strip().splitlines()
                assert stop.code == 2 and len(lines) == 1, (flag, value, lines)
                assert lines[0].startswith("error: ") and flag in lines[0], (flag, value, lines)
            else:
                assert value not in ("nan", "inf", "-inf"), (flag, value)
                accepted.setdefault(flag, []).append(value)
    return accepted


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_numeric_flag_is_accepted_or_refused_in_one_line(script, modules, capsys):
    assert len(numeric_flags(modules[script])) >= 10
    assert accepted_values(modules[script], capsys)["--seed"] == ["0"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_accepted_zeros_and_negatives_make_a_run(script, modules, request, tmp_path, capsys):
    accepted = {flag: values for flag, values in accepted_values(modules[script], capsys).items() if flag != "--seed"}
    assert "--gamma" in accepted
    for index in range(max(map(len, accepted.values()))):  # each accepted value once, in as few runs as it takes
        flags = [item for flag, values in accepted.items() if index < len(values) for item in (flag, values[index])]
        result = run_algorithm(
            script, ["--dataset", dataset_of(script, request), *TINY, *SCRIPTS[script][1], *flags], cwd=tmp_path
        )
        assert result.returncode == 0 and "Traceback" not in result.stderr, (flags, result.stderr)


# --------------------------------------------------------------------------------------------- interrupts and resume
def wait_for_checkpoint(process: subprocess.Popen, cwd) -> None:
    deadline = time.time() + 300
    while not list((cwd / "runs").glob("*/checkpoint.pt")):
        assert process.poll() is None and time.time() < deadline, process.communicate()
        time.sleep(0.05)


@pytest.mark.parametrize("script", SCRIPTS)
def test_sigint_then_resume_ends_as_a_straight_run(script, request, tmp_path):
    dataset = dataset_of(script, request)
    (tmp_path / "straight").mkdir()
    (tmp_path / "stopped").mkdir()
    straight = start(script, dataset, tmp_path / "straight")
    stopped = start(script, dataset, tmp_path / "stopped")
    wait_for_checkpoint(stopped, tmp_path / "stopped")
    stopped.send_signal(signal.SIGINT)
    result = finish(stopped)
    assert result.returncode == 130 and "Traceback" not in result.stderr, result.stderr
    (run_dir,) = (tmp_path / "stopped" / "runs").iterdir()
    assert f"--resume {run_dir.relative_to(tmp_path / 'stopped')}" in result.stderr.strip().splitlines()[-1]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["evaluations"] and summary["steps_done"] < 300
    assert (run_dir / "checkpoint.pt").is_file() and (run_dir / f"{script}.pt").is_file()

    resumed = run_algorithm(script, ["--resume", run_dir], cwd=tmp_path / "stopped")
    assert resumed.returncode == 0, resumed.stderr
    assert finish(straight).returncode == 0
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "finished"
    assert_same_results(run_dir, next((tmp_path / "straight" / "runs").iterdir()))


@pytest.mark.parametrize("script", ["bc", "td3_bc", "bcq_discrete"])
def test_killed_run_resumes_from_its_last_checkpoint(script, request, tmp_path):
    dataset = dataset_of(script, request)
    (tmp_path / "straight").mkdir()
    (tmp_path / "killed").mkdir()
    straight = start(script, dataset, tmp_path / "straight")
    killed = start(script, dataset, tmp_path / "killed")
    wait_for_checkpoint(killed, tmp_path / "killed")
    killed.kill()
    finish(killed)
    (run_dir,) = (tmp_path / "killed" / "runs").iterdir()
    resumed = run_algorithm(script, ["--resume", run_dir], cwd=tmp_path / "killed")
    assert resumed.returncode == 0, resumed.stderr
    assert finish(straight).returncode == 0
    assert_same_results(run_dir, next((tmp_path / "straight" / "runs").iterdir()))


@pytest.mark.parametrize("script", ["bc", "cql_sac_continuous"])
def test_resume_refuses_other_flags_and_finished_runs(script, request, tmp_path):
    result = run_algorithm(script, ["--resume", tmp_path / "nowhere"], cwd=tmp_path)
    assert_clean_failure(result, "checkpoint.pt does not exist", returncode=2)
    run_algorithm(script, ["--dataset", dataset_of(script, request), *TINY, *SCRIPTS[script][1]], cwd=tmp_path)
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert_clean_failure(run_algorithm(script, ["--resume", run_dir, "--seed", 9], cwd=tmp_path), "drop --seed")
    assert_clean_failure(run_algorithm(script, ["--resume", run_dir], cwd=tmp_path), "has finished")
    other = "iql" if script == "bc" else "td3_bc"
    assert_clean_failure(run_algorithm(other, ["--resume", run_dir], cwd=tmp_path), f"is not a run of {other}.py")
    # Killed after its last checkpoint, while writing its files: --resume writes them.
    for name in ("summary.json", "policy.pt2", f"{script}.pt"):
        (run_dir / name).unlink()
    assert run_algorithm(script, ["--resume", run_dir], cwd=tmp_path).returncode == 0
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "finished"
    assert (run_dir / "policy.pt2").is_file() and (run_dir / f"{script}.pt").is_file()


@pytest.mark.parametrize("script", SCRIPTS)
def test_sigterm_keeps_what_ctrl_c_keeps_in_the_order_that_loses_least(script, request, tmp_path):
    process = start(script, dataset_of(script, request), tmp_path)
    wait_for_checkpoint(process, tmp_path)
    process.send_signal(signal.SIGTERM)
    result = finish(process)
    assert result.returncode == 143 and "Traceback" not in result.stderr, result.stderr
    assert "--resume runs/" in result.stderr.strip().splitlines()[-1]
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "interrupted"
    written = [run_dir / name for name in ("checkpoint.pt", "summary.json", f"{script}.pt", "policy.pt2")]
    times = [path.stat().st_mtime_ns for path in written]
    assert times == sorted(times), dict(zip((path.name for path in written), times))


@pytest.mark.parametrize("delay", [0.2, 1.0, 2.0, 3.0, 5.0, 8.0])
def test_ctrl_c_at_any_moment_leaves_nothing_or_a_folder_that_resumes(delay, pendulum_dataset, tmp_path):
    process = start("td3_bc", pendulum_dataset, tmp_path)
    time.sleep(delay)
    process.send_signal(signal.SIGINT)
    result = finish(process)
    assert "Traceback" not in result.stderr and result.returncode in (0, 130, -signal.SIGINT), result.stderr
    run_dirs = list((tmp_path / "runs").iterdir()) if (tmp_path / "runs").exists() else []
    assert len(run_dirs) <= 1
    if run_dirs:  # then it checkpointed: --resume goes on from there, and the summary says where it stopped
        assert (run_dirs[0] / "checkpoint.pt").is_file() and (run_dirs[0] / "summary.json").is_file()
    else:
        assert_nothing_written(tmp_path)


def test_a_second_process_on_a_run_folder_is_refused(pendulum_dataset, tmp_path):
    long = ["--total-steps", 100_000, "--eval-freq", 100, "--eval-episodes", 2, "--seed", 5]
    stopped = start("td3_bc", pendulum_dataset, tmp_path, flags=long)
    wait_for_checkpoint(stopped, tmp_path)
    stopped.send_signal(signal.SIGINT)
    assert finish(stopped).returncode == 130
    (run_dir,) = (tmp_path / "runs").iterdir()
    first = subprocess.Popen(
        [sys.executable, str(ALGORITHMS / "td3_bc.py"), "--resume", str(run_dir)],
        cwd=tmp_path,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert "run folder" in first.stdout.readline()  # begin() has taken the folder
    second = run_algorithm("td3_bc", ["--resume", run_dir], cwd=tmp_path)
    assert_clean_failure(second, "is in use by another process", returncode=2)
    first.send_signal(signal.SIGINT)  # the first goes on untouched, and stops as a run stops
    assert finish(first).returncode == 130
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "interrupted"


@pytest.mark.parametrize("script", ["bc", "iql"])
def test_a_file_system_that_says_no_is_one_line(script, request, tmp_path):
    (tmp_path / "runs").write_text("a file where the run folders go")
    result = run_algorithm(script, ["--dataset", dataset_of(script, request), *TINY], cwd=tmp_path)
    assert_clean_failure(result, "cannot make a run folder", returncode=2)
    assert (tmp_path / "runs").read_text() == "a file where the run folders go"


def test_a_full_disk_stops_in_one_line_and_keeps_what_was_written(pendulum_dataset, tmp_path):
    import resource

    def small_files():  # a file may not grow past 60 kB, as on a disk that is full; EFBIG instead of SIGXFSZ
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, 60_000))

    result = subprocess.run(
        command("td3_bc", pendulum_dataset, flags=TINY),
        cwd=tmp_path,
        text=True,
        capture_output=True,
        preexec_fn=small_files,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert_clean_failure(result, "cannot write runs/", returncode=2)
    assert not list((tmp_path / "runs").rglob(".*.tmp"))


# --------------------------------------------------------------------------------------------- run folders
@pytest.mark.parametrize("script", ["bc", "iql", "cql_discrete_lunarlander"])
def test_runs_started_together_get_a_folder_each(script, request, tmp_path):
    processes = [start(script, dataset_of(script, request), tmp_path, flags=TINY) for _ in range(2)]
    assert all(finish(process).returncode == 0 for process in processes)
    run_dirs = sorted((tmp_path / "runs").iterdir())
    assert len(run_dirs) == 2 and all((run_dir / "summary.json").is_file() for run_dir in run_dirs)


def test_a_taken_folder_name_gets_a_suffix(cartpole_dataset, tmp_path):
    # Every name the next minute could give is taken, so the run must add a suffix and leave the others alone.
    now = int(time.time())
    taken = [tmp_path / "runs" / f"CartPole-v1__bc__scripted__5__{second}" for second in range(now - 2, now + 60)]
    for folder in taken:
        folder.mkdir(parents=True)
    result = run_algorithm("bc", ["--dataset", cartpole_dataset, *TINY], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    (new,) = set((tmp_path / "runs").iterdir()) - set(taken)
    assert new.name.endswith("-2") and (new / "summary.json").is_file()
    assert not any(any(folder.iterdir()) for folder in taken)
