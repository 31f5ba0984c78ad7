"""End-to-end tests of data_collection/collect_dataset.py through the real hf_hub_download path, offline."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
from conftest import COLLECTOR, load_npz, offline_env, run_script
from dataset_io import ARRAY_KEYS, REQUIRED_METADATA
from stable_baselines3 import PPO
from stable_baselines3.common.vec_env import VecNormalize


def collect(hub_cache, output, *extra):
    result = run_script(COLLECTOR, ["--output", output, "--reference-episodes", 2, *extra], offline_env(hub_cache))
    assert result.returncode == 0, result.stderr
    return load_npz(output)


@pytest.fixture(scope="module")
def cartpole_expert(hub_cache, tmp_path_factory):
    output = tmp_path_factory.mktemp("cartpole") / "expert.npz"
    # 1003 is not a multiple of 4 envs: the last step is partly cut off.
    return collect(
        hub_cache, output, "--env-id", "CartPole-v1", "--algo", "ppo", "--num-transitions", 1003, "--num-envs", 4
    )


@pytest.fixture(scope="module")
def pendulum_expert(hub_cache, tmp_path_factory):
    output = tmp_path_factory.mktemp("pendulum") / "expert.npz"
    return collect(
        hub_cache,
        output,
        "--env-id",
        "Pendulum-v1",
        "--algo",
        "ppo",
        "--num-transitions",
        900,
        "--num-envs",
        3,
        "--seed",
        7,
    )


def episode_slices(arrays):
    """Episodes as index ranges, split where a transition ends one (termination or truncation)."""
    ends = np.flatnonzero(arrays["terminations"] | arrays["truncations"])
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [slice(start, end + 1) for start, end in zip(starts, ends)]


def test_schema_and_dtypes(cartpole_expert, pendulum_expert):
    for arrays, metadata in (cartpole_expert, pendulum_expert):
        assert set(arrays) == set(ARRAY_KEYS)
        assert set(REQUIRED_METADATA) <= set(metadata)
        num = metadata["num_transitions"]
        for key in ("observations", "next_observations"):
            assert arrays[key].dtype == np.float32 and arrays[key].shape[0] == num
        for key, dtype in (("rewards", np.float32), ("terminations", np.bool_), ("truncations", np.bool_)):
            assert arrays[key].dtype == dtype and arrays[key].shape == (num,)
        assert arrays["episode_returns"].dtype == np.float32
        assert metadata["reference_returns"]["random"] is not None
        assert metadata["reference_returns"]["expert"] is not None
    cartpole, cartpole_metadata = cartpole_expert
    assert cartpole["observations"].shape == (1003, 4)
    assert cartpole["actions"].dtype == np.int64 and cartpole["actions"].shape == (1003,)
    assert cartpole_metadata["agent"] == "sb3/ppo-CartPole-v1"
    assert cartpole_metadata["env_id"] == "CartPole-v1" and cartpole_metadata["policy"] == "expert"
    pendulum, pendulum_metadata = pendulum_expert
    assert pendulum["actions"].dtype == np.float32 and pendulum["actions"].shape == (900, 1)
    assert pendulum_metadata["vec_normalize"] is True


def test_expert_actions_are_the_agents_deterministic_actions(agents, cartpole_expert):
    arrays, _ = cartpole_expert
    model = PPO.load(
        agents["cartpole"] / "ppo-CartPole-v1.zip",
        device="cpu",
        custom_objects={
            "observation_space": gym.make("CartPole-v1").observation_space,
            "action_space": gym.make("CartPole-v1").action_space,
        },
    )
    expected, _ = model.predict(arrays["observations"], deterministic=True)
    np.testing.assert_array_equal(arrays["actions"], expected)


def test_vec_normalize_agent_sees_normalised_inputs_file_holds_raw(agents, pendulum_expert):
    arrays, _ = pendulum_expert
    observations = arrays["observations"]
    # Raw Pendulum observations are (cos theta, sin theta, theta dot): on the unit circle, |theta dot| <= 8.
    np.testing.assert_allclose(observations[:, 0] ** 2 + observations[:, 1] ** 2, 1.0, atol=1e-5)
    env = gym.make("Pendulum-v1")
    model = PPO.load(
        agents["pendulum"] / "ppo-Pendulum-v1.zip",
        device="cpu",
        custom_objects={"observation_space": env.observation_space, "action_space": env.action_space},
    )
    with open(agents["pendulum"] / "vec_normalize.pkl", "rb") as file:
        from collect_dataset import GymToGymnasiumUnpickler

        normalizer: VecNormalize = GymToGymnasiumUnpickler(file).load()
    on_normalised, _ = model.predict(normalizer.normalize_obs(observations), deterministic=True)
    on_raw, _ = model.predict(observations, deterministic=True)
    np.testing.assert_allclose(arrays["actions"], on_normalised, atol=1e-6)
    assert not np.allclose(arrays["actions"], on_raw, atol=1e-3), "the agent should not act on raw observations"


def test_episode_ends_truncation_and_final_observation(pendulum_expert):
    arrays, metadata = pendulum_expert
    # Pendulum never terminates; its 200-step time limit truncates. 900 transitions over 3 envs = 300 steps:
    # each env finished one episode (200) and was cut after 100 more, which is also marked as a truncation.
    assert not arrays["terminations"].any()
    ends = np.flatnonzero(arrays["truncations"])
    np.testing.assert_array_equal(ends, [199, 399, 599, 699, 799, 899])
    assert metadata["num_episodes"] == 3 and len(arrays["episode_returns"]) == 3
    # Within an episode, next_observations[t] == observations[t + 1]; across an episode end it is not.
    same = np.all(arrays["next_observations"][:-1] == arrays["observations"][1:], axis=1)
    np.testing.assert_array_equal(np.flatnonzero(~same), ends[:-1])
    # Replaying env 0's first episode (seed 7) with the stored actions gives the stored final observation.
    env = gym.make("Pendulum-v1")
    observation, _ = env.reset(seed=7)
    np.testing.assert_allclose(observation, arrays["observations"][0], atol=1e-6)
    for action in arrays["actions"][:200]:
        observation, *_ = env.step(action)
    np.testing.assert_allclose(arrays["next_observations"][199], observation, atol=1e-5)


def test_terminations_hold_the_final_observation(cartpole_expert):
    arrays, _ = cartpole_expert
    terminal = arrays["next_observations"][arrays["terminations"]]
    assert len(terminal) > 0
    # CartPole terminates when |x| > 2.4 or |angle| > 12 degrees; a reset observation is within +-0.05.
    assert np.all((np.abs(terminal[:, 0]) > 2.4) | (np.abs(terminal[:, 2]) > np.radians(12)))
    assert not np.any(arrays["truncations"] & arrays["terminations"])


def test_episode_returns_match_rewards(cartpole_expert, pendulum_expert):
    for arrays, metadata in (cartpole_expert, pendulum_expert):
        slices = episode_slices(arrays)
        returns = arrays["episode_returns"]
        # Complete episodes come first; the episodes cut by the end of collection follow.
        assert len(returns) == metadata["num_episodes"] <= len(slices)
        np.testing.assert_allclose(returns, [arrays["rewards"][s].sum() for s in slices[: len(returns)]], rtol=1e-5)


def test_same_seed_same_file(hub_cache, tmp_path, cartpole_expert):
    again, metadata = collect(
        hub_cache,
        tmp_path / "again.npz",
        "--env-id",
        "CartPole-v1",
        "--algo",
        "ppo",
        "--num-transitions",
        1003,
        "--num-envs",
        4,
    )
    arrays, first_metadata = cartpole_expert
    for key in ARRAY_KEYS:
        np.testing.assert_array_equal(again[key], arrays[key])
    assert metadata["reference_returns"] == first_metadata["reference_returns"]


def test_same_file_whatever_code_path_the_matrix_products_take(hub_cache, tmp_path, pendulum_expert):
    """MKL_CBWR=COMPATIBLE makes MKL sum its products in another order, as another CPU does: the file is the same."""
    output = tmp_path / "compatible.npz"
    args = [
        "--output",
        output,
        "--reference-episodes",
        2,
        "--env-id",
        "Pendulum-v1",
        "--algo",
        "ppo",
        "--num-transitions",
        900,
        "--num-envs",
        3,
        "--seed",
        7,
    ]
    result = run_script(COLLECTOR, args, dict(offline_env(hub_cache), MKL_CBWR="COMPATIBLE"))
    assert result.returncode == 0, result.stderr
    again, metadata = load_npz(output)
    arrays, first_metadata = pendulum_expert
    for key in ARRAY_KEYS:
        np.testing.assert_array_equal(again[key], arrays[key])
    assert metadata["reference_returns"] == first_metadata["reference_returns"]


def test_noisy_discrete_takes_random_actions_at_the_given_rate(agents, hub_cache, tmp_path):
    arrays, metadata = collect(
        hub_cache,
        tmp_path / "noisy.npz",
        "--env-id",
        "CartPole-v1",
        "--policy",
        "noisy",
        "--algo",
        "ppo",
        "--num-transitions",
        4000,
        "--random-action-prob",
        0.5,
    )
    assert metadata["noise"] == {"random_action_prob": 0.5}
    env = gym.make("CartPole-v1")
    model = PPO.load(
        agents["cartpole"] / "ppo-CartPole-v1.zip",
        device="cpu",
        custom_objects={"observation_space": env.observation_space, "action_space": env.action_space},
    )
    expert_actions, _ = model.predict(arrays["observations"], deterministic=True)
    # A uniform action differs from the expert's with probability 1/2 among 2 actions: 0.5 * 0.5 = 0.25.
    assert 0.2 < np.mean(arrays["actions"] != expert_actions) < 0.3


def test_noisy_and_random_box_actions_stay_in_bounds(hub_cache, tmp_path):
    noisy, metadata = collect(
        hub_cache,
        tmp_path / "noisy.npz",
        "--env-id",
        "Pendulum-v1",
        "--policy",
        "noisy",
        "--algo",
        "ppo",
        "--num-transitions",
        400,
        "--noise-std",
        0.5,
    )
    assert metadata["noise"] == {"random_action_prob": 0.3, "gaussian_std": 0.5}
    random, random_metadata = collect(
        hub_cache, tmp_path / "random.npz", "--env-id", "Pendulum-v1", "--policy", "random", "--num-transitions", 400
    )
    assert random_metadata["agent"] is None
    # Pendulum has no default expert and no agent was named: the expert reference is left empty.
    assert random_metadata["reference_returns"]["expert"] is None
    for arrays in (noisy, random):
        assert np.all(np.abs(arrays["actions"]) <= 2.0)
    assert np.abs(random["actions"]).max() > 1.0, "uniform actions should use the whole [-2, 2] range"


def test_agent_path_uses_local_zip_and_its_vec_normalize(agents, tmp_path, pendulum_expert):
    arrays, metadata = collect(
        tmp_path / "empty-cache",
        tmp_path / "local.npz",
        "--env-id",
        "Pendulum-v1",
        "--agent-path",
        agents["pendulum"] / "ppo-Pendulum-v1.zip",
        "--num-transitions",
        900,
        "--num-envs",
        3,
        "--seed",
        7,
    )
    assert metadata["agent"] == str(agents["pendulum"] / "ppo-Pendulum-v1.zip")
    assert metadata["vec_normalize"] is True
    np.testing.assert_array_equal(arrays["actions"], pendulum_expert[0]["actions"])


# ------------------------------------------------------------------------------------ --policy sampled
def test_sampled_discrete_actions_are_drawn_from_the_agents_policy(agents, hub_cache, tmp_path, cartpole_expert):
    import torch

    arrays, metadata = collect(
        hub_cache,
        tmp_path / "sampled.npz",
        "--env-id",
        "CartPole-v1",
        "--policy",
        "sampled",
        "--algo",
        "ppo",
        "--num-transitions",
        4000,
    )
    assert metadata["policy"] == "sampled" and metadata["gsde_reset_every_step"] is False
    # The reference stays the deterministic agent's return, the same as the expert dataset's.
    assert metadata["reference_returns"] == cartpole_expert[1]["reference_returns"]
    env = gym.make("CartPole-v1")
    model = PPO.load(
        agents["cartpole"] / "ppo-CartPole-v1.zip",
        device="cpu",
        custom_objects={"observation_space": env.observation_space, "action_space": env.action_space},
    )
    observations = torch.as_tensor(arrays["observations"])
    with torch.no_grad():
        probabilities = model.policy.get_distribution(observations).distribution.probs.numpy()
    greedy = probabilities.argmax(axis=1)
    # A draw differs from the greedy action with probability 1 - max p: on average over the data's states.
    expected = np.mean(1.0 - probabilities.max(axis=1))
    assert expected > 0.1, "the tiny agent should be far from deterministic"
    assert abs(np.mean(arrays["actions"] != greedy) - expected) < 0.04


def test_sampled_same_seed_same_file_another_seed_other_actions(hub_cache, tmp_path):
    def sampled(name, seed):
        return collect(
            hub_cache,
            tmp_path / name,
            "--env-id",
            "Pendulum-v1",
            "--policy",
            "sampled",
            "--algo",
            "ppo",
            "--num-transitions",
            600,
            "--num-envs",
            3,
            "--seed",
            seed,
        )[0]

    first, again, other = sampled("a.npz", 5), sampled("b.npz", 5), sampled("c.npz", 6)
    for key in ARRAY_KEYS:
        np.testing.assert_array_equal(again[key], first[key])
    assert not np.array_equal(other["actions"], first["actions"])
    assert np.all(np.abs(first["actions"]) <= 2.0)


def test_gsde_agent_draws_a_new_exploration_matrix_every_step_and_env(tmp_path):
    """Without reset_noise() each step, gSDE's noise is one fixed function of the state: the same state, the same
    action. Sampled, the same observation in several envs and at two steps gets a different action each time."""
    from collect_dataset import Agent, AgentSource

    model = PPO("MlpPolicy", "Pendulum-v1", use_sde=True, policy_kwargs={"log_std_init": -3.0}, seed=0, device="cpu")
    model.save(tmp_path / "ppo-Pendulum-v1.zip")
    agent = Agent(AgentSource(algo="ppo", path=tmp_path / "ppo-Pendulum-v1.zip"), "Pendulum-v1")
    observations = np.tile(np.array([[1.0, 0.0, 0.5]], dtype=np.float32), (6, 1))
    first, second = agent.sample(observations), agent.sample(observations)
    deterministic = agent.act(observations)
    assert np.all(np.abs(first) < 2.0), "the noise should be small enough not to be clipped"
    assert len(np.unique(first)) == 6 and len(np.unique(second)) == 6
    assert not np.any(first == second) and not np.any(first == deterministic)
