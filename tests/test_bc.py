"""bc.py: its losses by hand, end-to-end runs on both action kinds, learning, bad input."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from conftest import assert_clean_failure, check_run_folder, load_algorithm, run_algorithm, run_folder, train


@pytest.fixture(scope="module")
def bc():
    return load_algorithm("bc")


# ------------------------------------------------------------------------------------ losses by hand
def test_cross_entropy_by_hand(bc):
    logits = torch.tensor([[0.0, math.log(3.0)], [0.0, 0.0]])  # probabilities [1/4, 3/4] and [1/2, 1/2]
    actions = torch.tensor([1, 0])
    expected = (-math.log(0.75) - math.log(0.5)) / 2
    assert bc.bc_loss(logits, actions, discrete=True, box_loss="mse").item() == pytest.approx(expected, abs=1e-6)


def test_mse_of_tanh_by_hand(bc):
    output = torch.tensor([[0.0, math.atanh(0.5)]])  # tanh gives [0, 0.5]
    actions = torch.tensor([[0.5, 0.5]])
    assert bc.bc_loss(output, actions, discrete=False, box_loss="mse").item() == pytest.approx(0.125, abs=1e-6)


def test_tanh_gaussian_nll_by_hand(bc):
    # mean 0, log_std 0 (std 1); the action tanh(0.5) comes from pre-tanh 0.5:
    # -log pi = -log N(0.5; 0, 1) + log(1 - tanh(0.5)^2).
    output = torch.tensor([[0.0, 0.0]])
    actions = torch.tensor([[math.tanh(0.5)]])
    expected = 0.5 * 0.25 + 0.5 * math.log(2 * math.pi) + math.log(1 - math.tanh(0.5) ** 2)
    assert bc.bc_loss(output, actions, discrete=False, box_loss="gaussian").item() == pytest.approx(expected, abs=1e-5)


def test_deterministic_action(bc):
    assert bc.deterministic_action(torch.tensor([[0.1, 2.0, -1.0]]), discrete=True, gaussian=False).tolist() == [1]
    output = torch.tensor([[0.5, -3.0]])  # gaussian: [mean, log_std]; the action is tanh(mean)
    assert bc.deterministic_action(output, False, True).item() == pytest.approx(math.tanh(0.5), abs=1e-6)


def test_one_update_takes_one_gradient_step_of_the_loss_computed_by_hand(bc):
    torch.manual_seed(0)
    for discrete in (True, False):
        policy = bc.Policy(3, 2, 16, 2)
        policy.obs_mean.fill_(0.5)
        policy.obs_std.fill_(2.0)
        by_hand = copy.deepcopy(policy)
        observations = torch.randn(8, 3)
        actions = torch.randint(2, (8,)) if discrete else torch.rand(8, 2) * 2 - 1
        batch = {"observations": observations, "actions": actions}
        optimizer = torch.optim.SGD(policy.parameters(), lr=0.1)
        scalars = bc.update(1, batch, policy, optimizer, bc.AlgorithmArgs(box_loss="mse"))
        output = by_hand.network((observations - 0.5) / 2.0)  # the standardisation done by hand
        if discrete:  # -log softmax(f(s))[a], and the share of argmax f(s) == a before the step
            loss = -(output - output.exp().sum(dim=-1, keepdim=True).log())[torch.arange(8), actions].mean()
            diagnostic = "diagnostics/accuracy", (output.argmax(dim=-1) == actions).float().mean()
        else:  # (tanh(f(s)) - a)^2 averaged over the batch and the action dimensions
            loss = ((torch.tanh(output) - actions) ** 2).mean()
            diagnostic = "diagnostics/action_mse", loss
        loss.backward()
        assert set(scalars) == {"losses/bc_loss", diagnostic[0]} and not scalars["losses/bc_loss"].requires_grad
        assert scalars["losses/bc_loss"].item() == pytest.approx(loss.item(), rel=1e-5)
        assert scalars[diagnostic[0]].item() == pytest.approx(diagnostic[1].item(), rel=1e-5)
        for moved, before in zip(policy.parameters(), by_hand.parameters()):  # one SGD step: p - lr * grad
            torch.testing.assert_close(moved, before - 0.1 * before.grad)
        assert policy.obs_mean.tolist() == [0.5] * 3 and policy.obs_std.tolist() == [2.0] * 3


# ------------------------------------------------------------------------------------ --top-fraction
def test_best_episodes_by_hand(bc):
    # Episodes: A terminates (return 3), B is truncated by the time limit of 2 steps (10), C is a segment cut short
    # after 1 step (100, no return of its own), D terminates (1); the last transition has no end (50).
    rewards = [1, 1, 1, 5, 5, 100, 0, 1, 50]
    terminations = [0, 0, 1, 0, 0, 0, 0, 1, 0]
    truncations = [0, 0, 0, 0, 1, 1, 0, 0, 0]
    data = {
        "rewards": torch.tensor(rewards, dtype=torch.float32),
        "terminations": torch.tensor(terminations, dtype=torch.float32),
        "truncations": torch.tensor(truncations, dtype=torch.float32),
    }
    for fraction, indices, returns in [
        (1.0, [0, 1, 2, 3, 4, 6, 7], [10, 3, 1]),
        (0.67, [0, 1, 2, 3, 4], [10, 3]),  # int(0.67 * 3) = 2 episodes
        (0.5, [3, 4], [10]),
        (0.01, [3, 4], [10]),  # at least one episode
    ]:
        kept, kept_returns = bc.best_episodes(data, fraction, time_limit=2)
        assert kept.tolist() == indices and kept_returns.tolist() == returns, fraction
    kept, kept_returns = bc.best_episodes(data, 1.0, time_limit=None)  # no time limit: truncations are all cuts
    assert kept.tolist() == [0, 1, 2, 6, 7] and kept_returns.tolist() == [3, 1]


def test_top_fraction_clones_the_best_episodes_and_records_them(cartpole_dataset, tmp_path):
    from conftest import load_npz

    arrays, _ = load_npz(cartpole_dataset)
    ends = np.flatnonzero(arrays["terminations"] | arrays["truncations"])
    starts = np.concatenate([[0], ends[:-1] + 1])
    lengths = ends - starts + 1
    returns = np.array([arrays["rewards"][start : end + 1].sum() for start, end in zip(starts, ends)])
    complete = arrays["terminations"][ends] | (lengths == 500)  # CartPole-v1's time limit
    best = np.sort(returns[complete])[::-1][: int(0.25 * complete.sum())]
    result = run_algorithm(
        "bc",
        [
            "--dataset",
            cartpole_dataset,
            "--top-fraction",
            0.25,
            "--total-steps",
            100,
            "--eval-freq",
            100,
            "--eval-episodes",
            2,
            "--no-save-model",
        ],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads((run_folder(tmp_path) / "summary.json").read_text())
    assert summary["kept_episodes"] == len(best) and summary["kept_mean_return"] == pytest.approx(best.mean())
    assert summary["kept_transitions"] == int(best.sum())  # CartPole pays 1 per step: a return is a length
    assert f"top_fraction 0.25, kept_episodes {len(best)}, kept_transitions {int(best.sum())}" in result.stdout


# ------------------------------------------------------------------------------------ end to end
@pytest.mark.parametrize(
    ("dataset", "env_id", "extra"),
    [
        ("cartpole_dataset", "CartPole-v1", []),
        ("pendulum_dataset", "Pendulum-v1", ["--box-loss", "mse"]),
    ],
)
def test_run_writes_events_model_summary_and_video(dataset, env_id, extra, request, tmp_path, bc):
    train(
        "bc",
        request.getfixturevalue(dataset),
        ["--total-steps", 200, "--eval-freq", 100, "--eval-episodes", 2, "--capture-video", "--seed", 3, *extra],
        tmp_path,
    )
    folder, _ = check_run_folder(tmp_path, "bc", env_id, 3, [100, 200], 2, {"losses/bc_loss"}, has_q_values=False)
    policy = bc.Policy(4, 2, 256, 2) if env_id == "CartPole-v1" else bc.Policy(3, 1, 256, 2)
    policy.load_state_dict(torch.load(folder / "bc.pt", weights_only=True))


def test_learns_cartpole_from_a_noisy_controller(cartpole_dataset, tmp_path):
    # The controller's action is the majority at each state (60% + half of the 40% random), so imitation
    # recovers the controller (500), well above the data's episodes (about 310).
    summary = train(
        "bc",
        cartpole_dataset,
        ["--total-steps", 2000, "--eval-freq", 2000, "--eval-episodes", 5, "--no-save-model"],
        tmp_path,
    )
    assert summary["final_mean_return"] >= 450, summary["final_returns"]


def test_gaussian_learns_pendulum_swing_up(pendulum_dataset, tmp_path):
    # The data's episodes average about -470; the controller gets about -130.
    summary = train(
        "bc",
        pendulum_dataset,
        ["--total-steps", 2000, "--eval-freq", 2000, "--eval-episodes", 5, "--box-loss", "gaussian", "--no-save-model"],
        tmp_path,
    )
    assert summary["final_mean_return"] >= -300, summary["final_returns"]


# ------------------------------------------------------------------------------------ bad input
def test_missing_dataset_prints_the_command_that_makes_it(tmp_path):
    result = run_algorithm("bc", ["--dataset", "datasets/Hopper-v5/noisy.npz"], cwd=tmp_path)
    assert_clean_failure(
        result, "does not exist", "python data_collection/collect_dataset.py --env-id Hopper-v5 --policy noisy"
    )


def test_env_not_matching_dataset_prints_both(cartpole_dataset, pendulum_dataset, tmp_path):
    result = run_algorithm("bc", ["--dataset", cartpole_dataset, "--env-id", "Acrobot-v1"], cwd=tmp_path)
    assert_clean_failure(result, "do not match", "obs_dim 4 and 2 actions", "(6,) and 3 actions")
    result = run_algorithm("bc", ["--dataset", pendulum_dataset, "--env-id", "CartPole-v1"], cwd=tmp_path)
    assert_clean_failure(result, "continuous actions of shape (1,)", "Discrete(2)")


def test_diverging_loss_stops_with_the_step(pendulum_dataset, tmp_path):
    result = run_algorithm(
        "bc",
        [
            "--dataset",
            pendulum_dataset,
            "--box-loss",
            "gaussian",
            "--learning-rate",
            1e10,
            "--total-steps",
            1000,
            "--eval-freq",
            1000,
        ],
        cwd=tmp_path,
    )
    assert_clean_failure(result, "at gradient step", "last finite losses")


@pytest.mark.parametrize("fraction", [0, -0.1, 1.5])
def test_top_fraction_outside_zero_one_is_refused(cartpole_dataset, tmp_path, fraction):
    result = run_algorithm("bc", ["--dataset", cartpole_dataset, "--top-fraction", fraction], cwd=tmp_path)
    assert_clean_failure(result, "--top-fraction must be in (0, 1]", returncode=2)
    assert not (tmp_path / "runs").exists()


def test_top_fraction_without_a_complete_episode_is_refused(tmp_path):
    from conftest import pendulum_controller, write_scripted_dataset

    # 4 envs for 10 steps: every Pendulum episode (200 steps) is cut short by the end of the collection.
    path = tmp_path / "Pendulum-v1" / "cut.npz"
    path.parent.mkdir()
    write_scripted_dataset(path, "Pendulum-v1", pendulum_controller, random_action_prob=0.0, num_transitions=40)
    result = run_algorithm("bc", ["--dataset", path, "--top-fraction", 0.1], cwd=tmp_path)
    assert_clean_failure(result, "has no complete episode", returncode=2)
    assert not (tmp_path / "runs").exists()
