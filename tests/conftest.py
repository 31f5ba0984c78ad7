"""Shared fixtures: tiny SB3 agents trained here, stored the way old sb3 Hub agents are, in a Hub cache.

The real sb3 agents pickle `gym.spaces.*` (the pre-gymnasium package) in their zip and vec_normalize.pkl.
The fixtures rewrite the tiny agents' pickles to name `gym.spaces` too, so that the tests go through the same
loading path as the real agents, with no network: HF_HUB_OFFLINE=1 and HF_HUB_CACHE point hf_hub_download at
a cache folder laid out as huggingface_hub writes it (refs/main holding a commit id, snapshots/<id>/<files>).
"""

from __future__ import annotations

import base64
import json
import os
import pickle
import subprocess
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COLLECTOR = ROOT / "data_collection" / "collect_dataset.py"
MIXER = ROOT / "data_collection" / "mix_datasets.py"
DESCRIBER = ROOT / "data_collection" / "describe_datasets.py"
sys.path.insert(0, str(ROOT / "data_collection"))
# The tests run in two workers on two cores (pytest -n 2): one torch thread each, or they slow each other down.
os.environ.setdefault("OMP_NUM_THREADS", "1")

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def as_old_gym_pickle(obj) -> bytes:
    # Protocol 2 writes classes as GLOBAL "module\nname\n" opcodes, so renaming the module is a byte edit.
    return pickle.dumps(obj, protocol=2).replace(b"cgymnasium.", b"cgym.")


def make_zip_old_style(zip_path: Path) -> None:
    """Make the zip's saved spaces unpicklable without the old `gym` package, as in the real sb3 agents."""
    with zipfile.ZipFile(zip_path) as archive:
        files = {name: archive.read(name) for name in archive.namelist()}
    data = json.loads(files["data"])
    for key in ("observation_space", "action_space"):
        space = pickle.loads(base64.b64decode(data[key][":serialized:"]))
        data[key][":serialized:"] = base64.b64encode(as_old_gym_pickle(space)).decode()
        data[key][":type:"] = data[key][":type:"].replace("gymnasium", "gym")
    files["data"] = json.dumps(data).encode()
    with zipfile.ZipFile(zip_path, "w") as archive:
        for name, content in files.items():
            archive.writestr(name, content)


def write_zoo_config(path: Path, normalize: bool) -> None:
    """config.yml as rl-zoo writes it: a yaml-dumped OrderedDict of the hyperparameters."""
    config = OrderedDict([("n_timesteps", 256), ("normalize", normalize), ("policy", "MlpPolicy")])
    path.write_text(yaml.dump(config))


def add_to_hub_cache(cache: Path, repo_id: str, files: dict[str, Path]) -> None:
    repo_folder = cache / f"models--{repo_id.replace('/', '--')}"
    (repo_folder / "refs").mkdir(parents=True)
    (repo_folder / "refs" / "main").write_text(COMMIT)  # no trailing newline, as huggingface_hub writes it
    snapshot = repo_folder / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    for name, source in files.items():
        (snapshot / name).write_bytes(source.read_bytes())


@pytest.fixture(scope="session")
def agents(tmp_path_factory):
    """Two tiny agents: PPO on CartPole-v1 (Discrete) and PPO under VecNormalize on Pendulum-v1 (Box, ±2)."""
    import torch
    from stable_baselines3 import PPO
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.vec_env import VecNormalize

    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("agents")
    (folder / "cartpole").mkdir()
    (folder / "pendulum").mkdir()
    cartpole = PPO("MlpPolicy", "CartPole-v1", n_steps=64, batch_size=64, n_epochs=1, seed=0, device="cpu")
    cartpole.learn(128)
    cartpole.save(folder / "cartpole" / "ppo-CartPole-v1.zip")
    make_zip_old_style(folder / "cartpole" / "ppo-CartPole-v1.zip")
    write_zoo_config(folder / "cartpole" / "config.yml", normalize=False)

    # Pendulum's angular velocity spans ±8: the normalised input the agent sees differs clearly from the raw one.
    venv = VecNormalize(make_vec_env("Pendulum-v1", n_envs=2, seed=0), norm_obs=True, norm_reward=False)
    pendulum = PPO("MlpPolicy", venv, n_steps=128, batch_size=64, n_epochs=1, seed=0, device="cpu")
    pendulum.learn(512)
    pendulum.save(folder / "pendulum" / "ppo-Pendulum-v1.zip")
    make_zip_old_style(folder / "pendulum" / "ppo-Pendulum-v1.zip")
    (folder / "pendulum" / "vec_normalize.pkl").write_bytes(as_old_gym_pickle(venv))
    write_zoo_config(folder / "pendulum" / "config.yml", normalize=True)
    return {"cartpole": folder / "cartpole", "pendulum": folder / "pendulum"}


@pytest.fixture(scope="session")
def hub_cache(agents, tmp_path_factory) -> Path:
    cache = tmp_path_factory.mktemp("hf-cache")
    add_to_hub_cache(
        cache,
        "sb3/ppo-CartPole-v1",
        {
            "ppo-CartPole-v1.zip": agents["cartpole"] / "ppo-CartPole-v1.zip",
            "config.yml": agents["cartpole"] / "config.yml",
        },
    )
    add_to_hub_cache(
        cache,
        "sb3/ppo-Pendulum-v1",
        {
            "ppo-Pendulum-v1.zip": agents["pendulum"] / "ppo-Pendulum-v1.zip",
            "config.yml": agents["pendulum"] / "config.yml",
            "vec_normalize.pkl": agents["pendulum"] / "vec_normalize.pkl",
        },
    )
    return cache


def offline_env(cache: Path) -> dict[str, str]:
    return dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache), PYTHONUNBUFFERED="1")


def run_script(script: Path, args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(script), *map(str, args)], env=env, capture_output=True, text=True, timeout=600, cwd=ROOT
    )


def assert_clean_failure(result: subprocess.CompletedProcess, *fragments: str, returncode: int | None = None) -> None:
    """A user mistake: a non-zero exit (exactly `returncode` if given), no traceback, and each fragment in stderr."""
    assert result.returncode != 0 and returncode in (None, result.returncode), (
        result.returncode,
        result.stdout,
        result.stderr,
    )
    assert "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, (fragment, result.stderr)


def load_npz(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    with np.load(path, allow_pickle=False) as file:
        arrays = {key: file[key] for key in file.files}
    return arrays, json.loads(str(arrays.pop("metadata")))


# ------------------------------------------------------------------------------------------ algorithm scripts
ALGORITHMS = ROOT / "algorithms"


def load_algorithm(name: str):
    """Import an algorithm script as a module (its training runs only under __main__), to test its functions."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ALGORITHMS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # tyro reads the flags' help from the module's source, which inspect finds here
    spec.loader.exec_module(module)
    return module


def cartpole_controller(observations: np.ndarray) -> np.ndarray:
    """A linear controller that balances CartPole for all 500 steps."""
    x, x_dot, theta, theta_dot = observations.T
    return (theta + 0.5 * theta_dot + 0.05 * x + 0.1 * x_dot > 0).astype(np.int64)


def pendulum_controller(observations: np.ndarray) -> np.ndarray:
    """Energy-pumping swing-up, then a PD balance near the top: -126 to -148 on Pendulum-v1 (random: about -1190)."""
    cos, sin, theta_dot = observations.T
    energy = 0.5 * theta_dot**2 + 10.0 * (cos - 1.0)  # 0 at rest upright (m = l = 1, g = 10)
    pump = np.where(energy < 0, 2.0 * np.sign(theta_dot), -0.5 * theta_dot)
    pump = np.where(np.abs(theta_dot) < 1e-3, 2.0, pump)  # start moving from rest
    balance = -10.0 * np.arctan2(sin, cos) - 2.0 * theta_dot
    return np.clip(np.where(cos > 0.85, balance, pump), -2.0, 2.0)[:, None].astype(np.float32)


def write_scripted_dataset(
    path: Path, env_id: str, controller, random_action_prob: float, num_transitions: int, seed: int = 0
):
    """A dataset of `controller` taking a uniform random action with probability `random_action_prob`, collected
    by the collector's own rollout code and written in the format of data_collection/dataset_io.py."""
    import gymnasium as gym
    from collect_dataset import collect, run_episodes, uniform_actions
    from dataset_io import describe_space, save_dataset

    env = gym.make(env_id)
    rng = np.random.default_rng(seed)

    def act(observations):
        actions = controller(observations)
        take_random = rng.random(len(observations)) < random_action_prob
        random_actions = uniform_actions(env.action_space, rng, len(observations))
        return np.where(take_random.reshape(-1, *([1] * (actions.ndim - 1))), random_actions, actions)

    arrays = collect(env_id, act, num_transitions, num_envs=4, seed=seed)
    seeds = [10_000 + i for i in range(5)]
    metadata = {
        "env_id": env_id,
        "policy": "scripted",
        "agent": None,
        "noise": {"random_action_prob": random_action_prob},
        "seed": seed,
        "num_transitions": num_transitions,
        "gymnasium_version": gym.__version__,
        "created_by": "tests",
        "observation_space": describe_space(env.observation_space),
        "action_space": describe_space(env.action_space),
        "reference_returns": {
            "random": float(
                run_episodes(env_id, lambda obs: uniform_actions(env.action_space, rng, len(obs)), seeds).mean()
            ),
            "expert": float(run_episodes(env_id, controller, seeds).mean()),
        },
    }
    save_dataset(path, arrays, metadata, overwrite=True)
    return path


def run_algorithm(name: str, args: list, cwd: Path) -> subprocess.CompletedProcess:
    """Run an algorithm script as a user does, from `cwd` (where its runs/ folder goes), one torch thread."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.run(
        [sys.executable, str(ALGORITHMS / f"{name}.py"), *map(str, args)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        cwd=cwd,
    )


def run_folder(cwd: Path) -> Path:
    (folder,) = (cwd / "runs").iterdir()
    return folder


SUMMARY_KEYS = {
    "args",
    "env_id",
    "dataset",
    "run_dir",
    "model_path",
    "final_returns",
    "final_mean_return",
    "final_std_return",
    "final_normalized_score",
    "total_steps",
    "wall_time_s",
    "eval_time_s",
    "updates_per_second",
    "evaluations",
}
EVALUATION_TAGS = {
    "charts/SPS",
    "eval/episodic_return",
    "eval/normalized_score",
    "diagnostics/q_initial",
    "diagnostics/discounted_return_initial",
}


def train(name: str, dataset: Path, args: list, cwd: Path) -> dict:
    """Run an algorithm script on `dataset` to its end and return its summary.json."""
    result = run_algorithm(name, ["--dataset", dataset, *args], cwd=cwd)
    assert result.returncode == 0, result.stderr
    return json.loads((run_folder(cwd) / "summary.json").read_text())


def tiny_box_batch() -> dict:
    """Eight random transitions of a 3-dimensional state and a 1-dimensional action in [-1, 1], every other one a
    termination: a batch for testing one update() of a Box script (drawn from torch's generator, in this order)."""
    import torch

    return {
        "observations": torch.randn(8, 3),
        "actions": torch.rand(8, 1) * 2 - 1,
        "rewards": torch.randn(8),
        "next_observations": torch.randn(8, 3),
        "terminations": (torch.arange(8) % 2).float(),
    }


def check_run_folder(
    cwd: Path,
    name: str,
    env_id: str,
    seed: int,
    eval_steps: list[int],
    episodes: int,
    loss_tags: set[str],
    has_q_values: bool = True,
) -> tuple[Path, dict]:
    """What every algorithm promises after a run with --capture-video: the run folder's name, TensorBoard events
    with the shared tags (q_initial only where the script has Q-values) and the script's losses, a video,
    summary.json with its keys and one entry per evaluation. Returns the folder and the summary."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    folder = run_folder(cwd)
    assert folder.name.startswith(f"{env_id}__{name}__scripted__{seed}__")
    assert list(folder.glob("events.out.tfevents.*")) and list((folder / "videos").glob("*.mp4"))
    summary = json.loads((folder / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary), SUMMARY_KEYS - set(summary)
    assert [evaluation["step"] for evaluation in summary["evaluations"]] == eval_steps
    assert summary["total_steps"] == eval_steps[-1] and len(summary["final_returns"]) == episodes
    assert np.isfinite(summary["final_returns"]).all() and summary["final_normalized_score"] is not None
    tags = set(EventAccumulator(str(folder)).Reload().Tags()["scalars"])
    expected = (EVALUATION_TAGS if has_q_values else EVALUATION_TAGS - {"diagnostics/q_initial"}) | loss_tags
    assert expected <= tags, expected - tags
    return folder, summary


@pytest.fixture(scope="session")
def pendulum_dataset(tmp_path_factory) -> Path:
    """10000 Pendulum-v1 transitions of the swing-up controller (about -130) taking a uniform random action 20% of
    the time (its episodes: about -470); no terminations, only time-limit truncations; actions in [-2, 2]."""
    path = tmp_path_factory.mktemp("data") / "Pendulum-v1" / "scripted.npz"
    path.parent.mkdir()
    return write_scripted_dataset(
        path, "Pendulum-v1", pendulum_controller, random_action_prob=0.2, num_transitions=10_000
    )


@pytest.fixture(scope="session")
def cartpole_dataset(tmp_path_factory) -> Path:
    """5000 CartPole transitions of a balancing controller that takes a random action 40% of the time: most
    episodes fail (terminations), and the data's mean return (about 310) is well below the controller's 500."""
    path = tmp_path_factory.mktemp("data") / "CartPole-v1" / "scripted.npz"
    path.parent.mkdir()
    return write_scripted_dataset(
        path, "CartPole-v1", cartpole_controller, random_action_prob=0.4, num_transitions=5000
    )
