"""td3_bc.py: its mathematics by hand, an end-to-end run whose saved model replays its evaluation, learning."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import check_run_folder, load_algorithm, tiny_box_batch, train

SCRIPT = "td3_bc"


@pytest.fixture(scope="module")
def td3_bc():
    torch.set_num_threads(1)  # as the script's default: the same floating-point sums when a test re-evaluates its model
    return load_algorithm(SCRIPT)


# ------------------------------------------------------------------------------------ mathematics by hand
def test_actor_loss_by_hand(td3_bc):
    # Two states: Q1(s, pi(s)) = 1 and -3, so lambda = alpha / mean|Q| = 2.5 / 2 = 1.25 and -lambda * mean Q = 1.25.
    q_policy = torch.tensor([1.0, -3.0], requires_grad=True)
    policy_actions = torch.tensor([[0.5, 0.0], [0.0, -1.0]], requires_grad=True)
    data_actions = torch.tensor([[0.0, 0.0], [1.0, -1.0]])
    loss, lmbda, bc_term = td3_bc.td3_bc_actor_loss(q_policy, policy_actions, data_actions, alpha=2.5)
    # The squared error is averaged over the 2 x 2 entries: (0.25 + 0 + 1 + 0) / 4.
    assert lmbda.item() == pytest.approx(1.25) and bc_term.item() == pytest.approx(0.3125)
    assert loss.item() == pytest.approx(1.25 + 0.3125)
    loss.backward()
    # lambda is a constant: d loss / d Q_i = -lambda / N, whatever the sign of Q_i.
    np.testing.assert_allclose(q_policy.grad, [-0.625, -0.625])
    np.testing.assert_allclose(policy_actions.grad, 2 * (policy_actions - data_actions).detach() / 4)


def test_target_policy_smoothing_and_clipped_double_q_by_hand(td3_bc):
    target_actions = torch.tensor([[0.9, 0.0, -0.2]])
    noise = torch.tensor([[0.3, -0.7, 0.1]])
    # The noise is clipped to +-0.5 first (-0.7 -> -0.5), then the sum to the box (1.2 -> 1).
    smoothed = td3_bc.smoothed_target_actions(target_actions, noise, noise_clip=0.5)
    np.testing.assert_allclose(smoothed, [[1.0, -0.5, -0.1]], rtol=1e-6)
    rewards, next_q1, next_q2 = torch.tensor([1.0, 2.0]), torch.tensor([5.0, -1.0]), torch.tensor([3.0, 4.0])
    target = td3_bc.td3_target(rewards, torch.tensor([0.0, 1.0]), next_q1, next_q2, gamma=0.9)
    assert target.tolist() == pytest.approx([1 + 0.9 * 3.0, 2.0])  # the min of the two; a terminal does not bootstrap


def test_actor_maps_its_box_to_the_env_bounds(td3_bc):
    actor = td3_bc.Actor(3, 1, 32, np.array([-2.0]), np.array([2.0]))
    with torch.no_grad():
        actor.network[-1].bias.fill_(100.0)
        assert actor.act(torch.randn(5, 3)).tolist() == [[2.0]] * 5
        actor.network[-1].bias.fill_(-100.0)
        assert actor.act(torch.randn(5, 3)).tolist() == [[-2.0]] * 5


def test_one_update_moves_the_actor_every_policy_freq_steps_towards_the_critics_target(td3_bc):
    torch.manual_seed(0)
    actor = td3_bc.Actor(3, 1, 16, np.array([-1.0]), np.array([1.0]))
    critic = td3_bc.TwinCritic(3, 1, 16)
    target_actor, target_critic = copy.deepcopy(actor), copy.deepcopy(critic)
    actor_optimizer = torch.optim.Adam(actor.parameters(), lr=1e-3)
    critic_optimizer = torch.optim.SGD(critic.parameters(), lr=0.0)  # the critic stays, so its target can be checked
    batch = tiny_box_batch()
    args = td3_bc.AlgorithmArgs(policy_noise=0.0, tau=0.5)
    networks = dict(actor=actor, critic=critic, target_actor=target_actor, target_critic=target_critic)
    before = [parameter.clone() for parameter in actor.parameters()]
    scalars = td3_bc.update(
        2, batch, **networks, actor_optimizer=actor_optimizer, critic_optimizer=critic_optimizer, args=args
    )
    # Step 2 with --policy-freq 2 updates the critics only: no actor loss, the actor and the targets stay.
    assert "losses/actor_loss" not in scalars and all(torch.equal(a, b) for a, b in zip(before, actor.parameters()))
    with torch.no_grad():  # without smoothing noise, the target is r + gamma (1 - d) min Q'(s', pi'(s'))
        next_q = torch.minimum(*target_critic(batch["next_observations"], target_actor(batch["next_observations"])))
        expected = batch["rewards"] + 0.99 * (1 - batch["terminations"]) * next_q
    assert scalars["diagnostics/target"].item() == pytest.approx(expected.mean().item(), rel=1e-5)
    q1, q2 = critic(batch["observations"], batch["actions"])
    critic_loss = torch.nn.functional.mse_loss(q1, expected) + torch.nn.functional.mse_loss(q2, expected)
    assert scalars["losses/critic_loss"].item() == pytest.approx(critic_loss.item(), rel=1e-5)
    old_target = [parameter.clone() for parameter in target_actor.parameters()]
    scalars = td3_bc.update(
        3, batch, **networks, actor_optimizer=actor_optimizer, critic_optimizer=critic_optimizer, args=args
    )
    # Step 3 updates the actor, then moves the targets half way (tau 0.5) to the updated online networks.
    assert "losses/actor_loss" in scalars and not all(torch.equal(a, b) for a, b in zip(before, actor.parameters()))
    for old, new, online in zip(old_target, target_actor.parameters(), actor.parameters()):
        torch.testing.assert_close(new, old + 0.5 * (online - old))


# ------------------------------------------------------------------------------------ end to end
def test_run_writes_files_and_saved_model_reproduces_evaluation(td3_bc, pendulum_dataset, tmp_path):
    train(
        SCRIPT,
        pendulum_dataset,
        ["--total-steps", 200, "--eval-freq", 100, "--eval-episodes", 2, "--capture-video", "--seed", 4],
        tmp_path,
    )
    folder, summary = check_run_folder(
        tmp_path,
        SCRIPT,
        "Pendulum-v1",
        4,
        [100, 200],
        2,
        {"losses/critic_loss", "losses/actor_loss", "diagnostics/lambda"},
    )
    actor = td3_bc.Actor(3, 1, 256, np.zeros(1), np.ones(1))
    critic = td3_bc.TwinCritic(3, 1, 256)
    torch.nn.ModuleDict({"actor": actor, "critic": critic}).load_state_dict(
        torch.load(folder / f"{SCRIPT}.pt", weights_only=True)
    )
    # The dataset's observation statistics and the env's bounds travel with the actor: act() takes raw observations.
    assert not torch.equal(actor.obs_std, torch.ones(3)) and actor.action_high.tolist() == [2.0]
    q_initial = lambda observations, actions: td3_bc.q_initial(actor, critic, observations)  # noqa: E731
    again = td3_bc.evaluate(td3_bc.ActingPolicy(actor), q_initial, "Pendulum-v1", 2, 4, 0.99, torch.device("cpu"), None)
    np.testing.assert_allclose(again["returns"], summary["final_returns"], rtol=1e-5)
    assert again["mean_return"] == pytest.approx(summary["final_mean_return"], rel=1e-5)
    assert again["normalized_score"] is None and isinstance(again["q_initial"], float)


def test_learns_pendulum_from_a_noisy_controller(pendulum_dataset, tmp_path):
    # A uniform random policy gets about -1190, the data's episodes about -470, the controller about -130. Measured
    # at the defaults: -223 and -149 after 6000 steps (seeds 1, 2), -651 and -857 after 2000.
    summary = train(
        SCRIPT,
        pendulum_dataset,
        ["--total-steps", 6000, "--eval-freq", 6000, "--eval-episodes", 5, "--no-save-model"],
        tmp_path,
    )
    assert summary["final_mean_return"] >= -400, summary["final_returns"]
