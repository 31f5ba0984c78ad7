"""Every algorithm script writes policy.pt2, a policy that runs without the script: results/evaluate_policy.py plays
it to the script's own final return, and plain torch.export.load acts with it. --capture-video works without a
screen, or refuses in one line before anything is written."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from conftest import assert_clean_failure, run_folder, train, write_scripted_dataset

EVALUATE_POLICY = Path(__file__).resolve().parents[1] / "results" / "evaluate_policy.py"
SHORT = ["--total-steps", 200, "--eval-freq", 200, "--eval-episodes", 3, "--seed", 4]
# Each script with the data it takes and flags that make it small.
CASES = [
    ("bc", "pendulum_dataset", ["--hidden-dim", 32]),
    ("bc", "cartpole_dataset", ["--hidden-dim", 32]),
    ("bcq_continuous", "pendulum_dataset", []),
    ("cql_sac_continuous", "pendulum_dataset", ["--num-random", 2, "--hidden-dim", 32]),
    ("td3_bc", "pendulum_dataset", ["--hidden-dim", 32]),
    ("iql", "pendulum_dataset", ["--hidden-dim", 32]),
    ("iql", "cartpole_dataset", ["--hidden-dim", 32]),
    ("cql_discrete_lunarlander", "cartpole_dataset", ["--hidden-dim", 32]),
    ("bcq_discrete", "cartpole_dataset", ["--hidden-dim", 32]),
]


def evaluate_policy(*args, env=None) -> subprocess.CompletedProcess:
    env = dict(os.environ if env is None else env, OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, str(EVALUATE_POLICY), *map(str, args)], capture_output=True, text=True, timeout=600, env=env
    )


@pytest.mark.parametrize("script, dataset, flags", CASES, ids=[f"{case[0]}-{case[1]}" for case in CASES])
def test_policy_file_plays_to_the_scripts_final_return(script, dataset, flags, request, tmp_path):
    summary = train(script, request.getfixturevalue(dataset), [*SHORT, *flags], cwd=tmp_path)
    policy_path = run_folder(tmp_path) / "policy.pt2"
    assert policy_path.is_file() and not list(run_folder(tmp_path).glob(".*"))

    result = evaluate_policy(policy_path)
    assert result.returncode == 0, result.stderr
    assert (
        f"return {summary['final_mean_return']:.1f} ± {summary['final_std_return']:.1f} over 3 episodes"
        in result.stdout
    ), (result.stdout, summary["final_returns"])

    # Your own code: no algorithm file, no pickle, any batch size, actions inside the env's space.
    extra_files = {"policy.json": ""}
    policy = torch.export.load(str(policy_path), extra_files=extra_files).module()
    env = gym.make(summary["env_id"])
    observations = np.stack([env.observation_space.sample() for _ in range(5)]).astype(np.float32)
    actions = policy(torch.as_tensor(observations)).numpy()
    assert all(env.action_space.contains(action.astype(env.action_space.dtype)) for action in actions)
    single = policy(torch.as_tensor(observations[:1])).numpy()
    if script != "bcq_continuous":  # BCQ samples its actions; the others act deterministically
        np.testing.assert_allclose(single, actions[:1], rtol=1e-5, atol=1e-6)
    assert summary["env_id"] in extra_files["policy.json"]


def test_summary_records_the_device_and_versions(pendulum_dataset, tmp_path):
    summary = train("bc", pendulum_dataset, ["--total-steps", 20, "--eval-freq", 20, "--eval-episodes", 2], tmp_path)
    assert summary["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    assert summary["versions"]["torch"] == torch.__version__ and summary["versions"]["gymnasium"] == gym.__version__
    assert summary["git_commit"] is None or len(summary["git_commit"].split("-")[0]) == 40


def test_evaluate_policy_refuses_what_it_cannot_play(tmp_path):
    assert_clean_failure(evaluate_policy(tmp_path / "none.pt2"), "does not exist", returncode=2)
    (tmp_path / "junk.pt2").write_bytes(b"not an archive")
    assert_clean_failure(evaluate_policy(tmp_path / "junk.pt2"), "is not a policy.pt2", returncode=2)


# ------------------------------------------------------------------------------------------------ headless video
@pytest.fixture(scope="module")
def hopper_dataset(tmp_path_factory) -> Path:
    """A few random Hopper-v5 episodes: enough to run a script for a handful of steps and render it."""
    path = tmp_path_factory.mktemp("data") / "Hopper-v5" / "scripted.npz"
    path.parent.mkdir()
    space, rng = gym.make("Hopper-v5").action_space, np.random.default_rng(0)

    def random_controller(observations):
        return rng.uniform(space.low, space.high, (len(observations), 3)).astype(np.float32)

    return write_scripted_dataset(path, "Hopper-v5", random_controller, random_action_prob=0.0, num_transitions=400)


def headless_env(**extra) -> dict:
    env = {key: value for key, value in os.environ.items() if key not in ("DISPLAY", "WAYLAND_DISPLAY", "MUJOCO_GL")}
    return dict(env, **extra)


def test_mujoco_video_without_a_screen(hopper_dataset, tmp_path):
    env = headless_env(OMP_NUM_THREADS="1")
    flags = [
        "--dataset",
        hopper_dataset,
        "--total-steps",
        10,
        "--eval-freq",
        10,
        "--eval-episodes",
        1,
        "--capture-video",
        "--hidden-dim",
        16,
    ]
    result = subprocess.run(
        [sys.executable, str(EVALUATE_POLICY.parents[1] / "algorithms" / "bc.py"), *map(str, flags)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if result.returncode == 0:
        assert list((run_folder(tmp_path) / "videos").glob("*.mp4"))
        played = evaluate_policy(run_folder(tmp_path) / "policy.pt2", "--capture-video", env=env)
        assert played.returncode == 0, played.stderr
        assert list((run_folder(tmp_path) / "policy_videos").glob("*.mp4"))
    else:  # a machine with neither EGL nor OSMesa: one line that says what to install, and nothing written
        assert_clean_failure(result, "cannot render Hopper-v5", "EGL or OSMesa", returncode=2)
        assert not (tmp_path / "runs").exists()


def test_a_renderer_that_cannot_work_is_refused_before_the_run(hopper_dataset, tmp_path):
    env = headless_env(MUJOCO_GL="glfw")  # needs a screen, and there is none
    result = subprocess.run(
        [
            sys.executable,
            str(EVALUATE_POLICY.parents[1] / "algorithms" / "bc.py"),
            "--dataset",
            str(hopper_dataset),
            "--total-steps",
            "10",
            "--capture-video",
        ],
        cwd=tmp_path,
        env=dict(env, OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert_clean_failure(result, "cannot render Hopper-v5", "MUJOCO_GL=glfw", returncode=2)
    assert not (tmp_path / "runs").exists()


def test_classic_control_video_without_a_screen(cartpole_dataset, tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            str(EVALUATE_POLICY.parents[1] / "algorithms" / "bc.py"),
            "--dataset",
            str(cartpole_dataset),
            "--total-steps",
            "10",
            "--eval-freq",
            "10",
            "--eval-episodes",
            "1",
            "--capture-video",
        ],
        cwd=tmp_path,
        env=headless_env(OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert list((run_folder(tmp_path) / "videos").glob("*.mp4"))
