"""iql.py: its mathematics by hand, end-to-end runs on both action kinds, learning, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import assert_clean_failure, check_run_folder, load_algorithm, run_algorithm, train

SCRIPT = "iql"


@pytest.fixture(scope="module")
def iql():
    torch.set_num_threads(1)  # as the script's default: the same floating-point sums when a test re-evaluates its model
    return load_algorithm(SCRIPT)


# ------------------------------------------------------------------------------------ mathematics by hand
def test_expectile_loss_by_hand(iql):
    # u = Q - V: a positive u weighs tau, a negative one 1 - tau.
    differences = torch.tensor([2.0, -1.0, 0.0, -3.0])
    expected = (0.7 * 4 + 0.3 * 1 + 0 + 0.3 * 9) / 4
    assert iql.expectile_loss(differences, 0.7).item() == pytest.approx(expected)
    assert iql.expectile_loss(differences, 0.5).item() == pytest.approx(0.5 * (4 + 1 + 9) / 4)  # half the MSE


def test_expectile_is_the_minimiser(iql):
    # Minimising the loss over a constant V gives the tau-expectile of the samples: above the mean for tau 0.7.
    samples = torch.tensor([0.0, 1.0, 2.0, 10.0])
    v = torch.zeros((), requires_grad=True)
    optimizer = torch.optim.SGD([v], lr=0.1)
    for _ in range(2000):
        optimizer.zero_grad()
        iql.expectile_loss(samples - v, 0.7).backward()
        optimizer.step()
    # The 0.7-expectile e solves 0.7 * sum_{x > e} (x - e) = 0.3 * sum_{x < e} (e - x); here e lies in (2, 10).
    e = (0.7 * 10 + 0.3 * 3) / (0.7 + 0.3 * 3)
    assert v.item() == pytest.approx(e, abs=1e-3) and v.item() > samples.mean().item()


def test_advantage_weights_and_target_by_hand(iql):
    weights = iql.advantage_weights(torch.tensor([0.0, 1.0, 2.0, -1.0]), beta=3.0, max_weight=100.0)
    np.testing.assert_allclose(weights, [1.0, math.exp(3.0), 100.0, math.exp(-3.0)], rtol=1e-6)  # exp(6) is clipped
    target = iql.iql_target(torch.tensor([1.0, 2.0]), torch.tensor([0.0, 1.0]), torch.tensor([5.0, 7.0]), 0.9)
    assert target.tolist() == pytest.approx([1 + 0.9 * 5.0, 2.0])


def test_log_prob_of_both_action_kinds(iql):
    actor = iql.Actor(3, 0, 4, 16)  # Discrete: 4 actions
    observations = torch.randn(5, 3)
    logits = actor.network(observations)
    np.testing.assert_allclose(actor.log_prob(observations, torch.tensor([0, 1, 2, 3, 0])).detach(),
                               torch.log_softmax(logits, -1).detach()[torch.arange(5), [0, 1, 2, 3, 0]], rtol=1e-5)
    actor = iql.Actor(3, 2, 0, 16)  # Box: a Gaussian with mean tanh(network(s)) and std exp(log_std)
    with torch.no_grad():
        actor.log_std.copy_(torch.tensor([0.0, math.log(0.5)]))
    actions = torch.rand(5, 2) * 2 - 1
    mean = torch.tanh(actor.network(observations))
    expected = torch.distributions.Normal(mean, torch.tensor([1.0, 0.5])).log_prob(actions).sum(-1)
    np.testing.assert_allclose(actor.log_prob(observations, actions).detach(), expected.detach(), rtol=1e-5)


# ------------------------------------------------------------------------------------ end to end
@pytest.mark.parametrize(("dataset", "env_id", "sizes"), [
    ("cartpole_dataset", "CartPole-v1", (4, 0, 2)), ("pendulum_dataset", "Pendulum-v1", (3, 1, 0))])
def test_run_writes_files_and_saved_model_reproduces_evaluation(iql, dataset, env_id, sizes, request, tmp_path):
    train(SCRIPT, request.getfixturevalue(dataset), ["--total-steps", 200, "--eval-freq", 100, "--eval-episodes", 2,
                                                     "--capture-video", "--seed", 4], tmp_path)
    folder, summary = check_run_folder(tmp_path, SCRIPT, env_id, 4, [100, 200], 2,
                                       {"losses/value_loss", "losses/critic_loss", "losses/actor_loss"})
    actor, critic = iql.Actor(*sizes, 256), iql.TwinCritic(*sizes, 256)
    modules = torch.nn.ModuleDict({"actor": actor, "critic": critic, "value": iql.mlp(sizes[0], 1, 256)})
    modules.load_state_dict(torch.load(folder / f"{SCRIPT}.pt", weights_only=True))
    assert not torch.equal(actor.obs_std, torch.ones(sizes[0]))  # the dataset's statistics travel with the actor
    low, high = (torch.zeros(0), torch.zeros(0)) if sizes[2] else (torch.tensor([-2.0]), torch.tensor([2.0]))
    again = iql.evaluate(iql.ActingPolicy(actor, low, high), critic, env_id, 2, 4, 0.99, summary["reward_scale"],
                         torch.device("cpu"), None)
    assert list(again) == ["mean_return", "std_return", "normalized_score", "q_initial", "discounted_return_initial",
                           "returns"] and again["normalized_score"] is None
    np.testing.assert_allclose(again["returns"], summary["final_returns"], rtol=1e-5)
    np.testing.assert_allclose(again["mean_return"], summary["final_mean_return"], rtol=1e-5)


def test_learns_pendulum_from_a_noisy_controller(pendulum_dataset, tmp_path):
    # A uniform random policy gets about -1190, the data's episodes about -470, the controller about -130. Measured
    # at the defaults: -281 and -151 after 3000 steps (seeds 1, 2).
    summary = train(SCRIPT, pendulum_dataset, ["--total-steps", 3000, "--eval-freq", 3000, "--eval-episodes", 5,
                                               "--no-save-model"], tmp_path)
    assert summary["final_mean_return"] >= -400, summary["final_returns"]


def test_learns_cartpole_from_a_noisy_controller(cartpole_dataset, tmp_path):
    # The data's episodes average about 310 (the controller takes a random action 40% of the time); the controller
    # balances for all 500 steps. Measured at the defaults: 500 after 1000, 2000 and 3000 steps (seed 1), 500 after
    # 2000 (seed 2).
    summary = train(SCRIPT, cartpole_dataset, ["--total-steps", 2000, "--eval-freq", 2000, "--eval-episodes", 5,
                                               "--no-save-model"], tmp_path)
    assert summary["final_mean_return"] >= 400, summary["final_returns"]


# ------------------------------------------------------------------------------------ bad input
def test_missing_dataset_prints_the_command_that_makes_it(tmp_path):
    result = run_algorithm(SCRIPT, ["--dataset", "datasets/LunarLander-v3/noisy.npz"], cwd=tmp_path)
    assert_clean_failure(result, "does not exist",
                         "python data_collection/collect_dataset.py --env-id LunarLander-v3 --policy noisy")


def test_env_not_matching_dataset_prints_both(cartpole_dataset, pendulum_dataset, tmp_path):
    result = run_algorithm(SCRIPT, ["--dataset", cartpole_dataset, "--env-id", "Acrobot-v1"], cwd=tmp_path)
    assert_clean_failure(result, "do not match", "obs_dim 4 and 2 actions", "(6,) and 3 actions")
    result = run_algorithm(SCRIPT, ["--dataset", pendulum_dataset, "--env-id", "CartPole-v1"], cwd=tmp_path)
    assert_clean_failure(result, "continuous actions of shape (1,)", "Discrete(2)")
    result = run_algorithm(SCRIPT, ["--dataset", pendulum_dataset, "--env-id", "MountainCarContinuous-v0"],
                           cwd=tmp_path)
    assert_clean_failure(result, "do not match", "obs_dim 3", "observation shape (2,)", "in [[-1.0], [1.0]]")


def test_diverging_loss_stops_with_the_step(pendulum_dataset, tmp_path):
    result = run_algorithm(SCRIPT, ["--dataset", pendulum_dataset, "--learning-rate", 1e10, "--total-steps", 1000,
                                    "--eval-freq", 1000], cwd=tmp_path)
    assert_clean_failure(result, "at gradient step", "last finite losses")
