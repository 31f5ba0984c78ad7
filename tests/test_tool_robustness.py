"""The tools of data_collection/ and results/: every kind of damaged dataset, policy file or summary.json is refused
in one line (exit status 2, no traceback, the same words in every tool), a policy is not played on an env of the other
action kind, MuJoCo's warnings about gymnasium's own models stay out of the terminal and the folder, and every numeric
flag given NaN, infinity, 0 or -1 is either taken or refused in one line that names it."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import typing
import zipfile
from pathlib import Path

import describe_datasets
import export_minari
import mix_datasets
import numpy as np
import pytest
import torch
from conftest import COLLECTOR, ROOT, assert_clean_failure, load_npz, run_script
from dataset_io import exit_on_dataset_error, flattened_types, parse_flags

RESULTS = ROOT / "results"


def load_tool(name: str):
    """A script of results/ as a module (results/ is not a package); what runs under __main__ does not run."""
    spec = importlib.util.spec_from_file_location(name, RESULTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # tyro reads the flags' help from the module's source, which inspect finds here
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tools():
    names = ("evaluate_policy", "plot_runs", "make_report", "run_matrix", "benchmark_speed", "count_flops")
    return {name: load_tool(name) for name in (*names, "d3rlpy_speed", "d3rlpy_learning")}


def one_error_line(capsys, call) -> str:
    """Run `call` in this process: it must stop with exit status 2 and one line on stderr, which is returned."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        call()
    assert stop.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in lines[0], lines
    return lines[0]


def run_main(module, argv: list, monkeypatch) -> None:
    """A data_collection tool's main as its command line runs it (DatasetError: one line, exit 2)."""
    monkeypatch.setattr(sys, "argv", [f"{module.__name__}.py", *map(str, argv)])
    exit_on_dataset_error(module.main)


# --------------------------------------------------------------------------------------------- damaged datasets
def flip_a_byte(path: Path, member: str) -> None:
    """Flip one byte inside a member's data of an uncompressed zip: the archive opens, the member fails its CRC."""
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(member)
    data = bytearray(path.read_bytes())
    data[info.header_offset + 30 + len(info.filename) + min(200, info.file_size - 1)] ^= 0xFF
    path.write_bytes(bytes(data))


def write_damaged(kind: str, source: Path, path: Path) -> None:
    arrays, metadata = load_npz(source)
    contents = {**arrays, "metadata": np.array(json.dumps(metadata))}
    changed = {
        "env-id-a-number": {"env_id": 5},
        "references-a-number": {"reference_returns": 5},
        "references-equal": {"reference_returns": {"random": -500.0, "expert": -500.0}},
        "action-space-a-list": {"action_space": [1, 2]},
    }
    if kind == "truncated":
        data = source.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "random-bytes":
        path.write_bytes(np.random.default_rng(0).bytes(5000))
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "bad-crc":
        np.savez(path, **contents)  # uncompressed, so the flipped byte reaches the CRC check, not zlib
        flip_a_byte(path, "rewards.npy")
    elif kind == "object-array":
        np.savez(path, **{**contents, "observations": np.array([{"a": 1}] * len(arrays["rewards"]), dtype=object)})
    elif kind == "metadata-not-json":
        np.savez(path, **{**contents, "metadata": np.array("{env_id: Pendulum")})
    elif kind.startswith("metadata-is-"):
        value = {"metadata-is-5": 5, "metadata-is-null": None, "metadata-is-a-list": [metadata]}[kind]
        np.savez(path, **{**contents, "metadata": np.array(json.dumps(value))})
    elif kind == "no-metadata":
        np.savez(path, **arrays)
    elif kind == "no-rewards":
        np.savez(path, **{key: value for key, value in contents.items() if key != "rewards"})
    elif kind == "observations-as-text":
        np.savez(path, **{**contents, "observations": arrays["observations"].astype(str)})
    elif kind == "a-folder":
        path.mkdir()
    elif kind in changed:
        np.savez(path, **{**contents, "metadata": np.array(json.dumps({**metadata, **changed[kind]}))})
    else:
        assert kind == "missing", kind


# What each tool that reads datasets says: the same words everywhere (data_collection/dataset_io.py).
DAMAGES = {
    "truncated": "it is not a whole .npz file",
    "random-bytes": "it is not a .npz file",
    "empty": "the file is empty",
    "bad-crc": "Bad CRC-32",
    "object-array": "observations holds Python objects",
    "metadata-not-json": "its metadata is not JSON",
    "metadata-is-5": "its metadata is 5, not a JSON object",
    "metadata-is-null": "its metadata is null, not a JSON object",
    "metadata-is-a-list": "its metadata is a list, not a JSON object",
    "no-metadata": "it has no metadata",
    "no-rewards": "it lacks rewards",
    "observations-as-text": "observations are <U",
    "a-folder": "is a folder",
    "missing": "does not exist",
    "env-id-a-number": "env_id is 5, expected",
    "references-a-number": "reference_returns is 5, expected",
    "action-space-a-list": "action_space is [1, 2], expected",
}
# What the d3rlpy scripts do not read, and so take: they run in d3rlpy's venv, import nothing from this repository,
# and check what they read in words of their own.
D3RLPY_TAKES = {
    "d3rlpy_speed": {
        "metadata-not-json",
        "metadata-is-5",
        "metadata-is-null",
        "metadata-is-a-list",
        "no-metadata",
        "env-id-a-number",
        "references-a-number",
        "action-space-a-list",
    },
    "d3rlpy_learning": {"references-a-number", "action-space-a-list"},
}


@pytest.fixture
def damaged(pendulum_dataset, tmp_path):
    def make(kind: str) -> Path:
        path = tmp_path / "Pendulum-v1" / f"{kind}.npz"
        path.parent.mkdir(exist_ok=True)
        write_damaged(kind, pendulum_dataset, path)
        return path

    return make


def dataset_readers(tools, good: Path, tmp_path: Path, monkeypatch) -> dict:
    """Each tool that reads a dataset file, as a call on a path."""
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    return {
        "describe_datasets": lambda path: run_main(describe_datasets, [path], monkeypatch),
        "mix_datasets": lambda path: run_main(
            mix_datasets, [good, path, "--output", tmp_path / "mix.npz"], monkeypatch
        ),
        "export_minari": lambda path: run_main(
            export_minari, [path, "--dataset-id", "test/pendulum/x-v0"], monkeypatch
        ),
        "run_matrix": tools["run_matrix"].dataset_fingerprint,
        "d3rlpy_speed": tools["d3rlpy_speed"].read_dataset,
        "d3rlpy_learning": tools["d3rlpy_learning"].read_dataset,
    }


READERS = ["describe_datasets", "mix_datasets", "export_minari", "run_matrix", "d3rlpy_speed", "d3rlpy_learning"]


@pytest.mark.parametrize("kind", DAMAGES)
@pytest.mark.parametrize("tool", READERS)
def test_a_damaged_dataset_is_one_line(tool, kind, tools, damaged, pendulum_dataset, tmp_path, monkeypatch, capsys):
    path = damaged(kind)
    read = dataset_readers(tools, pendulum_dataset, tmp_path, monkeypatch)[tool]
    if kind in D3RLPY_TAKES.get(tool, ()):
        read(str(path))
        return
    line = one_error_line(capsys, lambda: read(str(path) if tool.startswith("d3rlpy") else path))
    assert str(path) in line
    if not tool.startswith("d3rlpy"):  # the tools that share data_collection/dataset_io.py: one wording per kind
        assert DAMAGES[kind] in line, line
    assert not (tmp_path / "mix.npz").exists() and not list((tmp_path / "minari").rglob("*.hdf5"))


def test_equal_reference_returns_leave_no_score_and_no_traceback(
    damaged, pendulum_dataset, tmp_path, monkeypatch, capsys
):
    path = damaged("references-equal")
    run_main(describe_datasets, [path], monkeypatch)
    row = capsys.readouterr().out.strip().splitlines()[-1]
    assert "| n/a | -500.0 | -500.0 |" in row  # no normalised score: its scale would be zero
    run_main(mix_datasets, [path, path, "--output", tmp_path / "mix.npz"], monkeypatch)
    assert (tmp_path / "mix.npz").is_file()
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    run_main(export_minari, [path, "--dataset-id", "test/pendulum/equal-v0"], monkeypatch)
    assert "the Minari dataset gets no ref scores" in capsys.readouterr().out


def test_a_damaged_dataset_from_the_command_line(damaged):
    result = subprocess.run(
        [sys.executable, ROOT / "data_collection" / "describe_datasets.py", damaged("truncated")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert_clean_failure(result, DAMAGES["truncated"], returncode=2)
    assert len(result.stderr.strip().splitlines()) == 1


# --------------------------------------------------------------------------------------------- policy files
def export_policy(path: Path, env_id: str, observation_dim: int, action_space: dict, **extra) -> Path:
    """A policy.pt2 as the algorithm scripts write it (a torch.export program with policy.json beside it), of a
    tiny module: argmax of the first observations (Discrete), or tanh of them (Box)."""

    class Discrete(torch.nn.Module):
        def forward(self, observations):
            return observations[:, : action_space.get("n", 1)].argmax(dim=1)

    class Box(torch.nn.Module):
        def forward(self, observations):
            return torch.tanh(observations[:, : len(action_space.get("low", []))])

    module = Discrete() if "n" in action_space else Box()
    batch = torch.export.Dim("batch")
    program = torch.export.export(module, (torch.zeros(2, observation_dim),), dynamic_shapes=({0: batch},))
    info = {
        "env_id": env_id,
        "algorithm": "test",
        "observation_shape": [observation_dim],
        "action_space": action_space,
        "reference_returns": {"random": -200.0, "expert": -100.0},
        "evaluation": {"episodes": 2, "seed": 1},
        **extra,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(program, str(path), extra_files={"policy.json": json.dumps(info)})
    return path


@pytest.fixture(scope="module")
def policies(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("policies")
    return {
        "discrete": export_policy(folder / "discrete" / "policy.pt2", "MountainCar-v0", 2, {"n": 3}),
        "box": export_policy(
            folder / "box" / "policy.pt2", "MountainCarContinuous-v0", 2, {"low": [-1.0], "high": [1.0]}
        ),
        "half_cheetah": export_policy(
            folder / "half_cheetah" / "policy.pt2", "HalfCheetah-v5", 17, {"low": [-1.0] * 6, "high": [1.0] * 6}
        ),
    }


def write_npz(path: Path) -> None:
    with open(path, "wb") as file:  # np.savez adds .npz to a name without it
        np.savez(file, observations=np.zeros((3, 2), np.float32))


def write_damaged_policy(kind: str, source: Path, path: Path) -> None:
    if kind == "truncated":
        data = source.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "random-bytes":
        path.write_bytes(np.random.default_rng(0).bytes(5000))
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "bad-crc":
        path.write_bytes(source.read_bytes())  # torch.export stores its members uncompressed
        flip_a_byte(path, next(name for name in zipfile.ZipFile(source).namelist() if name.endswith("model.json")))
    elif kind == "a-dataset":  # a zip, but numpy's
        write_npz(path)
    elif kind in ("policy-json-not-json", "policy-json-a-list", "no-policy-json"):
        program = torch.export.load(str(source))
        extra = {"policy-json-not-json": {"policy.json": "{env_id"}, "policy-json-a-list": {"policy.json": "[1]"}}
        torch.export.save(program, str(path), extra_files=extra.get(kind))
    elif kind == "a-folder":
        path.mkdir()
    else:
        assert kind == "missing", kind


POLICY_DAMAGES = {
    "truncated": "it is not a zip archive",
    "random-bytes": "it is not a zip archive",
    "empty": "the file is empty",
    "bad-crc": "fails its CRC check",
    "a-dataset": "is not a policy.pt2 written by this project's scripts",
    "policy-json-not-json": "its policy.json is not JSON",
    "policy-json-a-list": "its policy.json is not a JSON object",
    "no-policy-json": "it holds no policy.json",
    "a-folder": "is a folder, not a policy file",
    "missing": "does not exist",
}


@pytest.mark.parametrize("kind", POLICY_DAMAGES)
def test_a_damaged_policy_file_is_one_line_without_torchs_log(kind, tools, policies, tmp_path, capfd):
    path = tmp_path / f"{kind}.pt2"
    write_damaged_policy(kind, policies["discrete"], path)
    capfd.readouterr()
    with pytest.raises(SystemExit) as stop:
        tools["evaluate_policy"].load_policy(path)
    err = capfd.readouterr().err  # the file descriptor, where torch's own log handler writes
    lines = err.strip().splitlines()
    assert stop.value.code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert str(path) in lines[0] and POLICY_DAMAGES[kind] in lines[0], lines[0]


def test_a_run_folder_given_for_its_policy_names_the_file(tools, policies, capsys):
    folder = policies["discrete"].parent
    line = one_error_line(capsys, lambda: tools["evaluate_policy"].load_policy(folder))
    assert f"give the policy file in it: {folder / 'policy.pt2'}" in line


def test_a_foreign_zip_from_the_command_line_is_one_line(tmp_path):
    write_npz(tmp_path / "policy.pt2")
    result = subprocess.run(
        [sys.executable, RESULTS / "evaluate_policy.py", tmp_path / "policy.pt2"],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert_clean_failure(result, "is not a policy.pt2 written by this project's scripts", returncode=2)
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.mark.parametrize(
    ("policy", "env_id", "fragments"),
    [
        ("discrete", "MountainCarContinuous-v0", ["3 discrete actions", "continuous actions", "MountainCar-v0"]),
        ("box", "MountainCar-v0", ["continuous actions of shape (1,)", "discrete actions", "MountainCarContinuous"]),
    ],
)
def test_a_policy_is_not_played_on_an_env_of_the_other_action_kind(
    policy, env_id, fragments, tools, policies, monkeypatch, capsys
):
    monkeypatch.setattr(sys, "argv", ["evaluate_policy.py", str(policies[policy]), "--env-id", env_id])
    line = one_error_line(capsys, tools["evaluate_policy"].main)
    assert env_id in line and all(fragment in line for fragment in fragments), line


def test_a_policy_plays_on_its_own_env(tools, policies, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["evaluate_policy.py", str(policies["box"]), "--episodes", "1"])
    tools["evaluate_policy"].main()
    assert "test on MountainCarContinuous-v0: return" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------- summary.json
SUMMARY_DAMAGES = {
    "truncated": lambda text: text[: len(text) // 2],
    "random-bytes": lambda text: np.random.default_rng(0).bytes(300),
    "empty": lambda text: "",
    "a-number": lambda text: "5",
    "null": lambda text: "null",
    "a-list": lambda text: "[1, 2]",
    "evaluations-not-objects": lambda text: json.dumps({**json.loads(text), "evaluations": [5]}),
    "env-id-a-number": lambda text: json.dumps({**json.loads(text), "env_id": 5}),
    "a-folder": None,
}


def write_summary(folder: Path, kind: str, summary: dict, name: str = "summary.json") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "a-folder":
        (folder / name).mkdir()
        return
    damaged = SUMMARY_DAMAGES[kind](json.dumps(summary))
    (folder / name).write_bytes(damaged if isinstance(damaged, bytes) else damaged.encode())


PLOTTED_SUMMARY = {
    "args": {"exp_name": "bc", "seed": 1},
    "env_id": "CartPole-v1",
    "dataset": "datasets/CartPole-v1/scripted.npz",
    "evaluations": [{"step": 100, "mean_return": 20.0, "normalized_score": 2.0}],
}


@pytest.mark.parametrize("kind", SUMMARY_DAMAGES)
def test_plot_runs_skips_a_damaged_summary_in_one_line(kind, tools, tmp_path, capsys):
    folder = tmp_path / "runs" / "CartPole-v1__bc__scripted__1__1700000000"
    write_summary(folder, kind, PLOTTED_SUMMARY)
    assert tools["plot_runs"].load_run(folder, ("exp_name",)) is None
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith(f"skipped {folder}: ") and "summary.json" in out[0], out


RECORD = {
    "env_id": "LunarLander-v3",
    "dataset": "expert",
    "algorithm": "CQL",
    "command": "python algorithms/x.py",
    "commit": "0123456",
    "wall_time_s": 60,
    "machine": {"cpu": "CPU", "cores": 2},
}
REPORTED_SUMMARY = {
    "final_mean_return": 1.0,
    "final_normalized_score": 1.0,
    "total_steps": 10,
    "updates_per_second": 1.0,
    "evaluations": [{"step": 10, "mean_return": 1.0, "normalized_score": 1.0}],
}


@pytest.mark.parametrize("name", ["run.json", "summary.json"])
@pytest.mark.parametrize("kind", SUMMARY_DAMAGES)
def test_make_report_stops_at_a_damaged_record_in_one_line(kind, name, tools, tmp_path, capsys):
    folder = tmp_path / "matrix" / "LunarLander-v3__expert__CQL__1"
    folder.mkdir(parents=True)
    (folder / "run.json").write_text(json.dumps(RECORD))
    (folder / "summary.json").write_text(json.dumps(REPORTED_SUMMARY))
    (folder / name).unlink()
    write_summary(folder, kind, RECORD if name == "run.json" else REPORTED_SUMMARY, name)
    if (kind, name) in (("env-id-a-number", "summary.json"), ("evaluations-not-objects", "run.json")):
        assert tools["make_report"].load_runs(tmp_path / "matrix")  # fields the report reads from the other file
        return
    line = one_error_line(capsys, lambda: tools["make_report"].load_runs(tmp_path / "matrix"))
    assert str(folder / name) in line and "git checkout" in line, line


@pytest.mark.parametrize("kind", ["truncated", "a-list", "a-folder"])
def test_benchmark_stops_at_a_damaged_default_run_before_measuring(kind, tools, tmp_path, capsys):
    write_summary(tmp_path / "runs" / "one", kind, REPORTED_SUMMARY)
    line = one_error_line(capsys, lambda: tools["benchmark_speed"].read_evaluation_shares(tmp_path / "runs"))
    assert str(tmp_path / "runs" / "one" / "summary.json") in line


# --------------------------------------------------------------------------------------------- MuJoCo's warnings
@pytest.fixture
def mujoco_default_warnings(tmp_path, monkeypatch):
    """MuJoCo's own warning handler (a tool may have set one in this process before), in an empty folder."""
    mujoco = pytest.importorskip("mujoco")
    mujoco.set_mju_user_warning(None)
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    mujoco.set_mju_user_warning(None)


def assert_quiet(folder: Path, err: str) -> None:
    assert "settotalmass" not in err and "deprecated" not in err, err
    assert not (folder / "MUJOCO_LOG.TXT").exists()


def test_the_check_itself_sees_mujocos_warning(mujoco_default_warnings, capfd):
    import gymnasium as gym

    gym.make("HalfCheetah-v5").close()
    assert "settotalmass" in capfd.readouterr().err and (mujoco_default_warnings / "MUJOCO_LOG.TXT").exists()


@pytest.mark.parametrize("tool", ["collect_dataset", "import_minari", "evaluate_policy"])
def test_half_cheetah_is_made_without_mujocos_deprecation_warning(tool, tools, mujoco_default_warnings, capfd):
    import collect_dataset
    import gymnasium as gym
    import import_minari

    if tool == "collect_dataset":  # export_minari and the collector's reference episodes make envs this way too
        collect_dataset.check_env("HalfCheetah-v5")
        collect_dataset.run_episodes("HalfCheetah-v5", lambda o: np.zeros((len(o), 6), np.float32), [0])
    elif tool == "import_minari":
        import_minari.make_today("HalfCheetah-v5").close()
    else:
        tools["evaluate_policy"].quiet_mujoco_deprecations("HalfCheetah-v5")
        gym.make("HalfCheetah-v5").close()
    assert_quiet(mujoco_default_warnings, capfd.readouterr().err)


def test_collect_and_play_half_cheetah_from_the_command_line(policies, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    collected = subprocess.run(
        [
            sys.executable,
            COLLECTOR,
            *("--env-id", "HalfCheetah-v5", "--policy", "random", "--num-transitions", "20", "--num-envs", "1"),
            *("--reference-episodes", "1", "--output", tmp_path / "random.npz"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        env=env,
    )
    assert collected.returncode == 0, collected.stderr
    assert_quiet(tmp_path, collected.stderr)
    played = subprocess.run(
        [sys.executable, RESULTS / "evaluate_policy.py", policies["half_cheetah"], "--episodes", "1"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        env=env,
    )
    assert played.returncode == 0 and "test on HalfCheetah-v5: return" in played.stdout, played.stderr
    assert_quiet(tmp_path, played.stderr)


# --------------------------------------------------------------------------------------------- numeric flags
def tyro_flags(args_class) -> list[str]:
    """The flags of a tyro dataclass that take numbers."""
    numeric = []
    for name, hint in typing.get_type_hints(args_class).items():
        types = flattened_types(hint)
        if types & {int, float} and bool not in types:
            numeric.append(f"--{name.replace('_', '-')}")
    return numeric


def argparse_flags(module, argv: list[str], monkeypatch) -> list[str]:
    """The flags of an argparse tool that take numbers, read from the parser its parse_args builds."""
    parsers = []
    original = argparse.ArgumentParser.parse_args

    def spy(self, *args, **kwargs):
        parsers.append(self)
        return original(self, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(argparse.ArgumentParser, "parse_args", spy)
        module.parse_args(argv)
    return [action.option_strings[0] for action in parsers[0]._actions if action.type in (int, float)]


def numeric_checks(tools, monkeypatch) -> dict:
    """Each tool with numeric flags: (its numeric flags, what its command line needs besides them, its parse-and-check
    call on a command line). A call returns when the flags are taken, and exits 2 with one line when refused."""
    import collect_dataset
    import import_minari

    def tyro_tool(module, check, needed: list[str]) -> tuple:
        return tyro_flags(module.Args), needed, lambda argv: check(parse_flags(module.Args, None, argv))

    def dataset_tool(module, needed: list[str]) -> tuple:
        flags, needed, call = tyro_tool(module, module.check_flags, needed)
        return flags, needed, lambda argv: exit_on_dataset_error(lambda: call(argv))

    def argparse_tool(module, needed: list[str], required: tuple = ()) -> tuple:
        return argparse_flags(module, [*required, *needed], monkeypatch), needed, module.parse_args

    evaluate, matrix, benchmark = tools["evaluate_policy"], tools["run_matrix"], tools["benchmark_speed"]
    return {
        "collect_dataset": dataset_tool(collect_dataset, []),
        "mix_datasets": dataset_tool(mix_datasets, ["a.npz", "b.npz"]),
        "import_minari": dataset_tool(import_minari, ["mujoco/pendulum/expert-v0"]),
        "evaluate_policy": (tyro_flags(evaluate.Args), ["policy.pt2"], evaluate.read_flags),
        "run_matrix": tyro_tool(matrix, matrix.check_flags, []),
        "benchmark_speed": tyro_tool(benchmark, benchmark.check_flags, []),
        "count_flops": argparse_tool(tools["count_flops"], ["train.py"], required=("--updates", "3")),
        "d3rlpy_speed": argparse_tool(tools["d3rlpy_speed"], ["--algo", "BC", "--dataset", "d.npz"]),
        "d3rlpy_learning": argparse_tool(tools["d3rlpy_learning"], ["--dataset", "d.npz"]),
    }


# Where NaN, infinity, 0 or -1 means something: a seed or an index of 0, no noise, no time limit.
TAKEN = {
    ("collect_dataset", "--seed", "0"),
    ("collect_dataset", "--random-action-prob", "0"),
    ("collect_dataset", "--noise-std", "0"),
    ("mix_datasets", "--reference-from", "0"),
    ("evaluate_policy", "--seed", "0"),
    ("run_matrix", "--stop-within", "inf"),
    ("d3rlpy_speed", "--seed", "0"),
    ("d3rlpy_learning", "--seed", "0"),
}


def test_every_numeric_flag_of_every_tool_is_taken_or_refused_in_one_line(tools, monkeypatch, capsys):
    swept = set()
    for tool, (flags, needed, check) in numeric_checks(tools, monkeypatch).items():
        assert flags, tool
        for flag in flags:
            for value in ("nan", "inf", "0", "-1"):
                capsys.readouterr()
                try:  # the flag first: count_flops passes whatever follows the script to the script
                    check([flag, value, *needed])
                except SystemExit as stop:
                    lines = capsys.readouterr().err.strip().splitlines()
                    assert stop.code == 2 and len(lines) == 1 and flag in lines[0], (tool, flag, value, lines)
                    assert "Traceback" not in lines[0] and (tool, flag, value) not in TAKEN, (tool, flag, value)
                else:
                    assert (tool, flag, value) in TAKEN, f"{tool} {flag} {value} was taken"
                swept.add((tool, flag))
    assert TAKEN <= {(tool, flag, value) for tool, flag in swept for value in ("nan", "inf", "0", "-1")}
    assert len(swept) >= 20, swept


@pytest.mark.parametrize(
    "tool", ["describe_datasets", "export_minari", "plot_runs", "make_report", "check_reuse", "check_short_runs"]
)
def test_the_other_tools_have_no_numeric_flag(tool, tools):
    module = tools.get(tool) or sys.modules.get(tool) or load_tool(tool)
    assert tyro_flags(module.Args) == []


@pytest.mark.parametrize("tool", ["plot_runs", "make_report", "check_reuse", "check_short_runs"])
def test_an_unknown_flag_is_one_line(tool, tmp_path):
    result = run_script(RESULTS / f"{tool}.py", ["--no-such-flag", "1"], env=dict(os.environ))
    assert_clean_failure(result, "Unrecognized options: --no-such-flag", returncode=2)
    assert len(result.stderr.strip().splitlines()) == 1
