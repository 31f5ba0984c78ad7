"""iql.py: its mathematics by hand, end-to-end runs on both action kinds, learning, bad input."""

from __future__ import annotations

import copy
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
    np.testing.assert_allclose(
        actor.log_prob(observations, torch.tensor([0, 1, 2, 3, 0])).detach(),
        torch.log_softmax(logits, -1).detach()[torch.arange(5), [0, 1, 2, 3, 0]],
        rtol=1e-5,
    )
    actor = iql.Actor(3, 2, 0, 16)  # Box: a Gaussian with mean tanh(network(s)) and std exp(log_std)
    with torch.no_grad():
        actor.log_std.copy_(torch.tensor([0.0, math.log(0.5)]))
    actions = torch.rand(5, 2) * 2 - 1
    mean = torch.tanh(actor.network(observations))
    expected = torch.distributions.Normal(mean, torch.tensor([1.0, 0.5])).log_prob(actions).sum(-1)
    np.testing.assert_allclose(actor.log_prob(observations, actions).detach(), expected.detach(), rtol=1e-5)


@pytest.mark.parametrize("n_actions", [3, 0])
def test_one_update_regresses_v_q_and_pi_on_targets_computed_by_hand(iql, n_actions):
    torch.manual_seed(0)
    action_dim = 0 if n_actions else 2
    actor, critic = iql.Actor(4, action_dim, n_actions, 16), iql.TwinCritic(4, action_dim, n_actions, 16)
    value, target_critic = iql.mlp(4, 1, 16), copy.deepcopy(critic)
    with torch.no_grad():  # a target critic unlike the critic, so that the Polyak step shows
        for parameter in target_critic.parameters():
            parameter.add_(0.1)
    actions = torch.randint(n_actions, (8,)) if n_actions else torch.rand(8, 2) * 2 - 1
    batch = {
        "observations": torch.randn(8, 4),
        "actions": actions,
        "rewards": torch.randn(8),
        "next_observations": torch.randn(8, 4),
        "terminations": (torch.arange(8) % 2).float(),
    }
    args = iql.AlgorithmArgs(total_steps=10, tau=0.5, gamma=0.9)
    optimizer = torch.optim.Adam([{"params": m.parameters()} for m in (actor, critic, value)], lr=1e-3)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, [lambda step: 1.0 - step / 10, lambda _: 1.0, lambda _: 1.0]
    )
    with torch.no_grad():  # the three losses, by hand, from the networks before the step
        observations = batch["observations"]
        advantage = torch.minimum(*target_critic(observations, actions)) - value(observations).squeeze(-1)
        value_loss = torch.mean(torch.where(advantage < 0, 0.3, 0.7) * advantage**2)
        weights = torch.exp(3.0 * advantage).clamp(max=100.0)
        actor_loss = -(weights * actor.log_prob(observations, actions)).mean()
        target = batch["rewards"] + 0.9 * (1 - batch["terminations"]) * value(batch["next_observations"]).squeeze(-1)
        q1, q2 = critic(observations, actions)
        critic_loss = ((q1 - target) ** 2).mean() + ((q2 - target) ** 2).mean()
    old_target, old_critic = copy.deepcopy(target_critic), copy.deepcopy(critic)
    scalars = iql.update(1, batch, actor, critic, target_critic, value, optimizer, schedule, args, reward_scale=2.0)
    for tag, expected in [
        ("losses/value_loss", value_loss),
        ("losses/actor_loss", actor_loss),
        ("losses/critic_loss", critic_loss),
        ("diagnostics/q_data", q1.mean() / 2.0),
        ("diagnostics/weight", weights.mean()),
    ]:
        assert scalars[tag].item() == pytest.approx(expected.item(), rel=1e-5), tag
        assert not scalars[tag].requires_grad
    # All three networks moved; the targets moved half way (tau 0.5) to the updated critic; the actor's rate decays.
    assert not torch.equal(old_critic.q1[0].weight, critic.q1[0].weight)
    for old, new, online in zip(old_target.parameters(), target_critic.parameters(), critic.parameters()):
        torch.testing.assert_close(new, old + 0.5 * (online - old))
    assert [group["lr"] for group in optimizer.param_groups] == pytest.approx([0.9e-3, 1e-3, 1e-3])


# ------------------------------------------------------------------------------------ end to end
@pytest.mark.parametrize(
    ("dataset", "env_id", "sizes"),
    [("cartpole_dataset", "CartPole-v1", (4, 0, 2)), ("pendulum_dataset", "Pendulum-v1", (3, 1, 0))],
)
def test_run_writes_files_and_saved_model_reproduces_evaluation(iql, dataset, env_id, sizes, request, tmp_path):
    train(
        SCRIPT,
        request.getfixturevalue(dataset),
        ["--total-steps", 200, "--eval-freq", 100, "--eval-episodes", 2, "--capture-video", "--seed", 4],
        tmp_path,
    )
    folder, summary = check_run_folder(
        tmp_path, SCRIPT, env_id, 4, [100, 200], 2, {"losses/value_loss", "losses/critic_loss", "losses/actor_loss"}
    )
    actor, critic = iql.Actor(*sizes, 256), iql.TwinCritic(*sizes, 256)
    modules = torch.nn.ModuleDict({"actor": actor, "critic": critic, "value": iql.mlp(sizes[0], 1, 256)})
    modules.load_state_dict(torch.load(folder / f"{SCRIPT}.pt", weights_only=True))
    assert not torch.equal(actor.obs_std, torch.ones(sizes[0]))  # the dataset's statistics travel with the actor
    low, high = (torch.zeros(0), torch.zeros(0)) if sizes[2] else (torch.tensor([-2.0]), torch.tensor([2.0]))
    q_initial = lambda observations, actions: iql.q_initial(actor, critic, observations, summary["reward_scale"])  # noqa: E731
    again = iql.evaluate(iql.ActingPolicy(actor, low, high), q_initial, env_id, 2, 4, 0.99, torch.device("cpu"), None)
    assert (
        list(again)
        == ["mean_return", "std_return", "normalized_score", "q_initial", "discounted_return_initial", "returns"]
        and again["normalized_score"] is None
    )
    np.testing.assert_allclose(again["returns"], summary["final_returns"], rtol=1e-5)
    np.testing.assert_allclose(again["mean_return"], summary["final_mean_return"], rtol=1e-5)


def test_learns_pendulum_from_a_noisy_controller(pendulum_dataset, tmp_path):
    # A uniform random policy gets about -1190, the data's episodes about -470, the controller about -130. Measured
    # at the defaults: -281 and -151 after 3000 steps (seeds 1, 2).
    summary = train(
        SCRIPT,
        pendulum_dataset,
        ["--total-steps", 3000, "--eval-freq", 3000, "--eval-episodes", 5, "--no-save-model"],
        tmp_path,
    )
    assert summary["final_mean_return"] >= -400, summary["final_returns"]


def test_learns_cartpole_from_a_noisy_controller(cartpole_dataset, tmp_path):
    # The data's episodes average about 310 (the controller takes a random action 40% of the time); the controller
    # balances for all 500 steps. Measured at the defaults: 500 after 1000, 2000 and 3000 steps (seed 1), 500 after
    # 2000 (seed 2).
    summary = train(
        SCRIPT,
        cartpole_dataset,
        ["--total-steps", 2000, "--eval-freq", 2000, "--eval-episodes", 5, "--no-save-model"],
        tmp_path,
    )
    assert summary["final_mean_return"] >= 400, summary["final_returns"]


# ------------------------------------------------------------------------------------ bad input
def test_missing_dataset_prints_the_command_that_makes_it(tmp_path):
    result = run_algorithm(SCRIPT, ["--dataset", "datasets/LunarLander-v3/noisy.npz"], cwd=tmp_path)
    assert_clean_failure(
        result, "does not exist", "python data_collection/collect_dataset.py --env-id LunarLander-v3 --policy noisy"
    )


def test_env_not_matching_dataset_prints_both(cartpole_dataset, pendulum_dataset, tmp_path):
    result = run_algorithm(SCRIPT, ["--dataset", cartpole_dataset, "--env-id", "Acrobot-v1"], cwd=tmp_path)
    assert_clean_failure(result, "do not match", "obs_dim 4 and 2 actions", "(6,) and 3 actions")
    result = run_algorithm(SCRIPT, ["--dataset", pendulum_dataset, "--env-id", "CartPole-v1"], cwd=tmp_path)
    assert_clean_failure(result, "continuous actions of shape (1,)", "Discrete(2)")
    result = run_algorithm(
        SCRIPT, ["--dataset", pendulum_dataset, "--env-id", "MountainCarContinuous-v0"], cwd=tmp_path
    )
    assert_clean_failure(result, "do not match", "obs_dim 3", "observation shape (2,)", "in [[-1.0], [1.0]]")


def test_diverging_loss_stops_with_the_step(pendulum_dataset, tmp_path):
    result = run_algorithm(
        SCRIPT,
        ["--dataset", pendulum_dataset, "--learning-rate", 1e10, "--total-steps", 1000, "--eval-freq", 1000],
        cwd=tmp_path,
    )
    assert_clean_failure(result, "at gradient step", "last finite losses")
