"""data_collection/import_minari.py and export_minari.py: Minari datasets in and out, with no network.

The Minari datasets are built here with Minari's own writer (create_dataset_from_buffers from real env rollouts;
DataCollector would need jax) in a Minari folder under tmp_path, so nothing touches ~/.minari.
"""

from __future__ import annotations

import json

import gymnasium as gym
import numpy as np
import pytest
from conftest import (
    ROOT,
    assert_clean_failure,
    load_npz,
    offline_env,
    pendulum_controller,
    run_algorithm,
    run_folder,
    run_script,
    write_scripted_dataset,
)

minari = pytest.importorskip("minari")
from gymnasium.envs.registration import EnvSpec  # noqa: E402
from minari.data_collector import EpisodeBuffer  # noqa: E402

IMPORTER = ROOT / "data_collection" / "import_minari.py"
EXPORTER = ROOT / "data_collection" / "export_minari.py"


@pytest.fixture
def minari_folder(tmp_path, monkeypatch):
    folder = tmp_path / "minari"
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(folder))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return folder


def environment(minari_folder) -> dict[str, str]:
    """The scripts' environment: the test's Minari folder, no Hub access."""
    return dict(offline_env(minari_folder / "no-hf-cache"), MINARI_DATASETS_PATH=str(minari_folder))


def rollout(env: gym.Env, seed: int, cut_after: int | None = None, flag_cut: bool = True) -> EpisodeBuffer:
    """One episode of uniform random actions; `cut_after` steps stop it early, marked truncated (as DataCollector
    marks an episode reset before its end) if `flag_cut`, else with neither flag."""
    env.action_space.seed(seed)
    observation, _ = env.reset(seed=seed)
    observations, actions, rewards, terminations, truncations = [observation], [], [], [], []
    while True:
        action = env.action_space.sample()
        observation, reward, terminated, truncated, _ = env.step(action)
        observations.append(observation)
        actions.append(action)
        rewards.append(reward)
        if cut_after is not None and len(rewards) == cut_after:
            truncated = truncated or flag_cut
        terminations.append(terminated)
        truncations.append(truncated)
        if terminated or truncated or len(rewards) == cut_after:
            break
    return EpisodeBuffer(
        observations=np.array(observations),
        actions=np.array(actions),
        rewards=np.array(rewards),
        terminations=np.array(terminations),
        truncations=np.array(truncations),
    )


def make_minari_dataset(dataset_id: str, env: str | EnvSpec, buffers: list[EpisodeBuffer], **kwargs):
    with pytest.warns(UserWarning):  # Minari warns about the metadata fields left empty
        return minari.create_dataset_from_buffers(dataset_id, buffers, env=env, author="tests", **kwargs)


def minari_transitions(dataset_id: str) -> dict[str, np.ndarray]:
    """The transitions as Minari's own reader gives them: step t of an episode goes from observations[t] to [t+1]."""
    episodes = list(minari.load_dataset(dataset_id).iterate_episodes())
    return {
        "observations": np.concatenate([episode.observations[:-1] for episode in episodes]),
        "next_observations": np.concatenate([episode.observations[1:] for episode in episodes]),
        "actions": np.concatenate([episode.actions for episode in episodes]),
        "rewards": np.concatenate([episode.rewards for episode in episodes]),
        "terminations": np.concatenate([episode.terminations for episode in episodes]),
        "truncations": np.concatenate([episode.truncations for episode in episodes]),
        "lengths": np.array([len(episode) for episode in episodes]),
        "returns": np.array([episode.rewards.sum() for episode in episodes]),
    }


def test_import_discrete_then_train_bc(minari_folder, tmp_path):
    env = gym.make("CartPole-v1")
    # Random CartPole episodes end in terminations; the fourth is cut and marked truncated, the last is cut with
    # neither flag (create_dataset_from_buffers accepts that).
    buffers = [rollout(env, seed, cut_after=5 if seed == 3 else None) for seed in range(11)]
    buffers.append(rollout(env, 11, cut_after=7, flag_cut=False))
    make_minari_dataset("tests/cartpole/random-v0", "CartPole-v1", buffers, algorithm_name="uniform random")
    output = tmp_path / "cartpole.npz"
    result = run_script(
        IMPORTER,
        ["tests/cartpole/random-v0", "--output", output, "--reference-episodes", 2],
        environment(minari_folder),
    )
    assert result.returncode == 0, result.stderr
    assert "1 of 12 Minari episodes end with neither a termination nor a truncation" in result.stdout
    assert f"wrote {output}: " in result.stdout and "11 complete episodes" in result.stdout

    arrays, metadata = load_npz(output)
    expected = minari_transitions("tests/cartpole/random-v0")
    assert arrays["actions"].dtype == np.int64 and arrays["actions"].shape == (expected["lengths"].sum(),)
    for key in ("observations", "next_observations", "actions", "rewards", "terminations"):
        np.testing.assert_array_equal(arrays[key], expected[key].astype(arrays[key].dtype), err_msg=key)
    # The one change: the unflagged end of the last episode becomes a truncation.
    truncations = expected["truncations"].copy()
    truncations[-1] = True
    np.testing.assert_array_equal(arrays["truncations"], truncations)
    assert arrays["truncations"][np.cumsum(expected["lengths"])[3] - 1]  # the flagged cut stays a truncation
    np.testing.assert_allclose(arrays["episode_returns"], expected["returns"][:-1], rtol=1e-6)
    # next_observations at an episode end is the final observation, not the next episode's reset one.
    end = expected["lengths"][0] - 1
    assert arrays["terminations"][end]
    assert not np.array_equal(arrays["next_observations"][end], arrays["observations"][end + 1])

    assert metadata["env_id"] == "CartPole-v1" and metadata["policy"] == "minari"
    assert metadata["agent"] == "tests/cartpole/random-v0" and metadata["algo"] == "uniform random"
    assert metadata["minari"]["author"] == ["tests"] and metadata["minari"]["dataset_id"] == "tests/cartpole/random-v0"
    assert metadata["num_transitions"] == len(arrays["rewards"])
    assert metadata["action_space"] == {"type": "Discrete", "n": 2}
    references = metadata["reference_returns"]
    assert references["expert"] is None and 5.0 < references["random"] < 100.0 and references["episodes"] == 2

    result = run_algorithm(
        "bc",
        ["--dataset", output, "--total-steps", 20, "--eval-freq", 20, "--eval-episodes", 2, "--seed", 5],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads((run_folder(tmp_path) / "summary.json").read_text())
    assert summary["total_steps"] == 20 and len(summary["final_returns"]) == 2
    assert summary["final_normalized_score"] is None  # no expert reference: no normalised score, as in the collector


def test_import_box_maps_an_old_env_id_and_keeps_ref_scores(minari_folder, tmp_path):
    # An old dataset: collected on LunarLanderContinuous-v2, which today's gymnasium replaces by -v3.
    old = EnvSpec(
        id="LunarLanderContinuous-v2",
        entry_point="gymnasium.envs.box2d.lunar_lander:LunarLander",
        kwargs={"continuous": True},
        max_episode_steps=1000,
    )
    env = gym.make(old)
    make_minari_dataset(
        "tests/lander/random-v1",
        old,
        [rollout(env, seed) for seed in range(2)],
        ref_min_score=-250.0,
        ref_max_score=280.0,
    )
    output = tmp_path / "lander.npz"
    result = run_script(IMPORTER, ["tests/lander/random-v1", "--output", output], environment(minari_folder))
    assert result.returncode == 0, result.stderr
    assert "collected on LunarLanderContinuous-v2, which gymnasium" in result.stdout
    assert "replaces by LunarLanderContinuous-v3" in result.stdout

    arrays, metadata = load_npz(output)
    expected = minari_transitions("tests/lander/random-v1")
    assert arrays["actions"].dtype == np.float32 and arrays["actions"].shape == (expected["lengths"].sum(), 2)
    for key in ("observations", "next_observations", "actions", "rewards", "terminations", "truncations"):
        np.testing.assert_array_equal(arrays[key], expected[key].astype(arrays[key].dtype), err_msg=key)
    np.testing.assert_allclose(arrays["episode_returns"], expected["returns"], rtol=1e-6)
    assert metadata["env_id"] == "LunarLanderContinuous-v3"
    assert metadata["minari"]["env_spec"]["id"] == "LunarLanderContinuous-v2"
    references = metadata["reference_returns"]
    assert (references["random"], references["expert"]) == (-250.0, 280.0)


def test_export_then_load_with_minari_and_import_back(minari_folder, tmp_path):
    # 4 envs of 250 steps each: 4 complete Pendulum episodes (200 steps, time-limit truncations) and 4 cut ones.
    ours = write_scripted_dataset(tmp_path / "scripted.npz", "Pendulum-v1", pendulum_controller, 0.2, 1000)
    arrays, metadata = load_npz(ours)
    result = run_script(
        EXPORTER, [ours, "--dataset-id", "ours/pendulum/scripted-v0", "--author", "Ada"], environment(minari_folder)
    )
    assert result.returncode == 0, result.stderr
    assert "wrote Minari dataset ours/pendulum/scripted-v0" in result.stdout

    dataset = minari.load_dataset("ours/pendulum/scripted-v0")
    assert dataset.env_spec.id == "Pendulum-v1" and dataset.total_steps == 1000 and dataset.total_episodes == 8
    assert dataset.storage.metadata["author"] == {"Ada"}
    assert dataset.storage.metadata["ref_min_score"] == pytest.approx(metadata["reference_returns"]["random"])
    assert dataset.storage.metadata["ref_max_score"] == pytest.approx(metadata["reference_returns"]["expert"])
    ends = np.flatnonzero(arrays["terminations"] | arrays["truncations"])
    assert [len(episode) for episode in dataset.iterate_episodes()] == np.diff(np.concatenate([[-1], ends])).tolist()
    exported = minari_transitions("ours/pendulum/scripted-v0")
    for key in ("observations", "next_observations", "actions", "rewards", "terminations", "truncations"):
        np.testing.assert_array_equal(exported[key].astype(arrays[key].dtype), arrays[key], err_msg=key)
    assert minari.list_local_datasets().keys() == {"ours/pendulum/scripted-v0"}  # no staging folder is left listed

    back = tmp_path / "back.npz"
    result = run_script(IMPORTER, ["ours/pendulum/scripted-v0", "--output", back], environment(minari_folder))
    assert result.returncode == 0, result.stderr
    imported, imported_metadata = load_npz(back)
    for key in ("observations", "next_observations", "actions", "rewards", "terminations", "truncations"):
        np.testing.assert_array_equal(imported[key], arrays[key], err_msg=key)
    assert imported_metadata["env_id"] == "Pendulum-v1"
    assert imported_metadata["reference_returns"]["expert"] == pytest.approx(metadata["reference_returns"]["expert"])


def test_export_refuses_an_existing_or_malformed_id(minari_folder, tmp_path):
    ours = write_scripted_dataset(tmp_path / "scripted.npz", "Pendulum-v1", pendulum_controller, 0.2, 400)
    args = [ours, "--dataset-id", "ours/pendulum/small-v0"]
    assert run_script(EXPORTER, args, environment(minari_folder)).returncode == 0
    result = run_script(EXPORTER, args, environment(minari_folder))
    assert_clean_failure(result, "ours/pendulum/small-v0 already exists", "--overwrite", returncode=2)
    result = run_script(EXPORTER, [*args, "--overwrite"], environment(minari_folder))
    assert result.returncode == 0, result.stderr
    assert minari.load_dataset("ours/pendulum/small-v0").total_steps == 400
    result = run_script(EXPORTER, [ours, "--dataset-id", "no version"], environment(minari_folder))
    assert_clean_failure(result, "malformed Minari dataset id", "NAMESPACE/NAME-vN", returncode=2)


def test_import_refuses_unknown_and_malformed_ids(minari_folder):
    result = run_script(IMPORTER, ["tests/nothing-v0"], environment(minari_folder))
    assert_clean_failure(
        result, "not in the local Minari folder", "`minari download tests/nothing-v0`", "--download", returncode=2
    )
    result = run_script(IMPORTER, ["hopper medium"], environment(minari_folder))
    assert_clean_failure(result, "malformed Minari dataset id", returncode=2)


def test_import_reports_what_the_download_says(minari_folder, monkeypatch):
    import import_minari
    from dataset_io import DatasetError
    from minari.storage import hosting

    def unknown(dataset_id, force_download=False):
        raise ValueError(f"Couldn't find any version for dataset {dataset_id} in the remote Farama server.")

    monkeypatch.setattr(hosting, "download_dataset", unknown)
    with pytest.raises(DatasetError, match="unknown Minari dataset id tests/nothing-v0"):
        import_minari.open_minari_dataset(minari, "tests/nothing-v0", download=True)

    def offline(dataset_id, force_download=False):
        raise ConnectionError("no network")

    monkeypatch.setattr(hosting, "download_dataset", offline)
    with pytest.raises(DatasetError, match="downloading Minari dataset tests/nothing-v0 failed: ConnectionError"):
        import_minari.open_minari_dataset(minari, "tests/nothing-v0", download=True)


def test_import_refuses_a_dict_observation_space(minari_folder):
    # A goal-conditioned dataset, as AntMaze's: Dict observations.
    box = gym.spaces.Box(-1, 1, (2,))
    observation_space = gym.spaces.Dict({"observation": box, "goal": box})
    observations = {"observation": np.zeros((4, 2), np.float32), "goal": np.ones((4, 2), np.float32)}
    buffer = EpisodeBuffer(
        observations=observations,
        actions=np.zeros(3, np.int64),
        rewards=np.zeros(3),
        terminations=np.array([False, False, True]),
        truncations=np.zeros(3, bool),
    )
    with pytest.warns(UserWarning):
        minari.create_dataset_from_buffers(
            "tests/maze/goals-v0", [buffer], observation_space=observation_space, action_space=gym.spaces.Discrete(4)
        )
    result = run_script(IMPORTER, ["tests/maze/goals-v0"], environment(minari_folder))
    assert_clean_failure(result, "tests/maze/goals-v0 has observations Dict(", "flat vectors", returncode=2)


def test_import_refuses_an_old_env_id_whose_spaces_changed(minari_folder):
    # Collected on "Hopper-v3" with 12 observations: today's Hopper-v5 has 11, so the id cannot just be replaced.
    old = EnvSpec(
        id="Hopper-v3",
        entry_point="gymnasium.envs.mujoco.hopper_v5:HopperEnv",
        max_episode_steps=1000,
        kwargs={"exclude_current_positions_from_observation": False},
    )
    make_minari_dataset("tests/hopper/old-v0", old, [rollout(gym.make(old), 0, cut_after=3)])
    result = run_script(IMPORTER, ["tests/hopper/old-v0"], environment(minari_folder))
    assert_clean_failure(result, "do not fit Hopper-v5 (today's id for Hopper-v3)", "(12,)", "(11,)", returncode=2)


def test_export_splits_episodes_at_flags_and_needs_them_contiguous():
    from dataset_io import DatasetError
    from export_minari import split_episodes

    observations = np.arange(12, dtype=np.float32).reshape(6, 2)
    next_observations = np.concatenate([observations[1:], [[-1.0, -1.0]]])
    next_observations[2] = [9.0, 9.0]  # the end of the first episode: its final observation, not the next reset
    arrays = {
        "observations": observations,
        "next_observations": next_observations,
        "terminations": np.array([0, 0, 1, 0, 0, 0], bool),
        "truncations": np.zeros(6, bool),
    }
    starts, ends, cut = split_episodes(arrays, "file")
    assert starts.tolist() == [0, 3] and ends.tolist() == [2, 5] and cut  # the last episode ends without a flag
    arrays["next_observations"][3] = [7.0, 7.0]
    with pytest.raises(DatasetError, match=r"next_observations\[3\] is not observations\[4\]"):
        split_episodes(arrays, "file")
