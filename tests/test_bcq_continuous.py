"""bcq_continuous.py: its mathematics by hand, action bounds that are not +-1, an end-to-end run, learning."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import check_run_folder, load_algorithm, tiny_box_batch, train

SCRIPT = "bcq_continuous"
PENDULUM_LOW, PENDULUM_HIGH = np.array([-2.0], dtype=np.float32), np.array([2.0], dtype=np.float32)


@pytest.fixture(scope="module")
def bcq():
    torch.set_num_threads(1)  # as the script's default: the same floating-point sums when a test re-evaluates its model
    return load_algorithm(SCRIPT)


# ------------------------------------------------------------------------------------ mathematics by hand
def test_soft_clipped_double_q_target_by_hand(bcq):
    # 2 next states x 3 actions sampled from the VAE, with fixed values of the two target critics.
    next_q1 = torch.tensor([[1.0, 5.0, 2.0], [0.0, -1.0, 3.0]])
    next_q2 = torch.tensor([[3.0, 1.0, 2.0], [4.0, -2.0, 1.0]])
    # lambda * min + (1 - lambda) * max with lambda 0.75, action by action.
    mixed = [
        [0.75 * 1 + 0.25 * 3, 0.75 * 1 + 0.25 * 5, 2.0],
        [0.75 * 0 + 0.25 * 4, 0.75 * -2 + 0.25 * -1, 0.75 * 1 + 0.25 * 3],
    ]
    np.testing.assert_allclose(bcq.soft_clipped_double_q(next_q1, next_q2, 0.75), mixed)
    assert mixed == [[1.5, 2.0, 2.0], [1.0, -1.75, 1.5]]
    # The target takes the best sampled action of each state; the terminal second state does not bootstrap.
    rewards = torch.tensor([1.0, 0.5])
    target = bcq.bcq_target(rewards, torch.tensor([0.0, 1.0]), next_q1, next_q2, 0.9, 0.75)
    assert target.tolist() == pytest.approx([1 + 0.9 * 2.0, 0.5])
    target = bcq.bcq_target(rewards, torch.tensor([0.0, 0.0]), next_q1, next_q2, 0.9, 0.75)
    assert target.tolist() == pytest.approx([1 + 0.9 * 2.0, 0.5 + 0.9 * 1.5])
    # lambda 1 is clipped double Q-learning (the min), lambda 0 the max of the two critics.
    assert bcq.bcq_target(rewards, torch.zeros(2), next_q1, next_q2, 0.9, 1.0).tolist() == pytest.approx(
        [1 + 0.9 * 2, 0.5 + 0.9 * 1]
    )
    assert bcq.bcq_target(rewards, torch.zeros(2), next_q1, next_q2, 0.9, 0.0).tolist() == pytest.approx(
        [1 + 0.9 * 5, 0.5 + 0.9 * 4]
    )


def test_best_sampled_action_kl_and_perturbation_by_hand(bcq):
    candidates = torch.tensor([[[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]], [[-0.1, -0.2], [-0.3, -0.4], [-0.5, -0.6]]])
    actions, q_values = bcq.best_sampled_action(torch.tensor([[1.0, 3.0, 2.0], [7.0, 0.0, 5.0]]), candidates)
    np.testing.assert_allclose(actions, [[0.3, 0.4], [-0.1, -0.2]])
    assert q_values.tolist() == [3.0, 7.0]
    # KL(N(mu, sigma) || N(0, 1)) per dimension is (mu^2 + sigma^2 - 1) / 2 - log(sigma), averaged.
    assert bcq.vae_kl(torch.zeros(2, 3), torch.ones(2, 3)).item() == pytest.approx(0.0)
    mean, std = torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 2.0]])
    assert bcq.vae_kl(mean, std).item() == pytest.approx((0.5 + (4 - 1) / 2 - np.log(2)) / 2)
    # The perturbation is phi * tanh(raw), then the result is clipped to [-1, 1].
    perturbed = bcq.perturb(torch.tensor([[0.0, 0.98, -0.5]]), torch.tensor([[100.0, 100.0, -np.arctanh(0.5)]]), 0.05)
    np.testing.assert_allclose(perturbed, [[0.05, 1.0, -0.525]], rtol=1e-6)


def test_action_normalisation_uses_the_env_bounds(bcq):
    low, high = torch.tensor([-2.0, 0.0]), torch.tensor([2.0, 1.0])
    env_actions = torch.tensor([[-2.0, 0.0], [2.0, 1.0], [0.0, 0.5], [1.0, 0.75]])
    normalised = bcq.normalize_actions(env_actions, low, high)
    np.testing.assert_allclose(normalised, [[-1, -1], [1, 1], [0, 0], [0.5, 0.5]])
    np.testing.assert_allclose(bcq.unnormalize_actions(normalised, low, high), env_actions)


# ------------------------------------------------------------------------------------ actions stay in bounds (+-2)
def test_acting_stays_in_pendulum_bounds_and_perturbs_at_most_phi(bcq):
    torch.manual_seed(0)
    policy = bcq.BCQPolicy(3, 1, PENDULUM_LOW, PENDULUM_HIGH, phi=0.05)
    angles = torch.rand(200) * 2 * np.pi
    states = torch.stack([angles.cos(), angles.sin(), torch.rand(200) * 16 - 8], dim=1)
    sampled = torch.rand(200, 1) * 2 - 1
    for bias in (0.0, 100.0, -100.0):  # an untrained actor, and one pushed to its largest perturbation either way
        with torch.no_grad():
            policy.actor.network[-1].bias.fill_(bias)
            perturbation = policy.actor(states, sampled) - sampled
            chosen, _ = policy.act(states, 100)
            env_actions = bcq.unnormalize_actions(chosen, policy.action_low, policy.action_high)
        assert perturbation.abs().max().item() <= 0.05 + 1e-6
        if bias:  # pushed to the bound: exactly +-phi, except where the clip to [-1, 1] cuts it
            inside = sampled.abs() < 0.95
            np.testing.assert_allclose(perturbation[inside], np.sign(bias) * 0.05, rtol=1e-5)
        # In env units the perturbation is at most phi * (high - low) / 2 = 0.1 on Pendulum.
        env_perturbation = bcq.unnormalize_actions(
            sampled + perturbation, policy.action_low, policy.action_high
        ) - bcq.unnormalize_actions(sampled, policy.action_low, policy.action_high)
        assert env_perturbation.abs().max().item() <= 0.1 + 1e-5
        assert (env_actions >= -2.0).all() and (env_actions <= 2.0).all()
    # Saturated networks reach the env's bound of 2, not the +-1 of a normalised space.
    with torch.no_grad():
        policy.vae.decoder[-1].bias.fill_(100.0)
        policy.actor.network[-1].bias.fill_(100.0)
        chosen, _ = policy.act(states, 10)
    np.testing.assert_allclose(
        bcq.unnormalize_actions(chosen, policy.action_low, policy.action_high), np.full((200, 1), 2.0)
    )


def test_one_update_regresses_the_critics_on_the_soft_clipped_target_and_moves_the_target_actor_by_tau(bcq):
    torch.manual_seed(0)
    policy = bcq.BCQPolicy(3, 1, PENDULUM_LOW, PENDULUM_HIGH, phi=0.05, vae_hidden_dim=16)
    target_actor, target_critic = copy.deepcopy(policy.actor), copy.deepcopy(policy.critic)
    # The VAE and the critics stay (learning rate 0), so that the target and the losses can be recomputed after.
    optimizers = dict(
        vae_optimizer=torch.optim.SGD(policy.vae.parameters(), lr=0.0),
        actor_optimizer=torch.optim.Adam(policy.actor.parameters(), lr=1e-3),
        critic_optimizer=torch.optim.SGD(policy.critic.parameters(), lr=0.0),
    )
    batch = tiny_box_batch()
    args = bcq.AlgorithmArgs(target_samples=4, tau=0.5, lmbda=0.75, gamma=0.9)
    old_actor, old_target_actor = copy.deepcopy(policy.actor), copy.deepcopy(target_actor)
    torch.manual_seed(1)
    scalars = bcq.update(1, batch, policy, target_actor, target_critic, **optimizers, args=args)
    # Replayed from the same seed: the VAE's reparameterisation noise, then the target's latents clipped to +-0.5.
    torch.manual_seed(1)
    noise = torch.randn(8, 2)
    latents = torch.randn(8 * 4, 2).clamp(-0.5, 0.5)
    with torch.no_grad():
        hidden = torch.relu(policy.vae.encoder(torch.cat([batch["observations"], batch["actions"]], dim=1)))
        mean, std = policy.vae.mean(hidden), policy.vae.log_std(hidden).clamp(-4, 15).exp()
        reconstruction = policy.vae.decode(batch["observations"], mean + std * noise)
        kl = (0.5 * (mean**2 + std**2 - 1) - torch.log(std)).mean()
        next_observations = batch["next_observations"].repeat_interleave(4, dim=0)
        next_actions = old_target_actor(next_observations, policy.vae.decode(next_observations, latents))
        next_q1, next_q2 = (q.view(8, 4) for q in target_critic(next_observations, next_actions))
        mixed = 0.75 * torch.minimum(next_q1, next_q2) + 0.25 * torch.maximum(next_q1, next_q2)
        expected = batch["rewards"] + 0.9 * (1 - batch["terminations"]) * mixed.max(dim=1).values
        q1, q2 = policy.critic(batch["observations"], batch["actions"])
    assert scalars["losses/kl_loss"].item() == pytest.approx(kl.item(), rel=1e-5)
    reconstruction_loss = ((reconstruction - batch["actions"]) ** 2).mean()
    assert scalars["losses/reconstruction_loss"].item() == pytest.approx(reconstruction_loss.item(), rel=1e-5)
    assert scalars["losses/vae_loss"].item() == pytest.approx(reconstruction_loss.item() + 0.5 * kl.item(), rel=1e-5)
    assert scalars["diagnostics/target"].item() == pytest.approx(expected.mean().item(), rel=1e-5)
    critic_loss = ((q1 - expected) ** 2).mean() + ((q2 - expected) ** 2).mean()
    assert scalars["losses/critic_loss"].item() == pytest.approx(critic_loss.item(), rel=1e-5)
    # The actor moved; the target actor moved half way (tau 0.5) to it; the target critics follow critics that stayed.
    assert not all(torch.equal(a, b) for a, b in zip(old_actor.parameters(), policy.actor.parameters()))
    for old, new, online in zip(old_target_actor.parameters(), target_actor.parameters(), policy.actor.parameters()):
        torch.testing.assert_close(new, old + 0.5 * (online - old))
    assert all(torch.equal(a, b) for a, b in zip(target_critic.parameters(), policy.critic.parameters()))
    assert all(value.dim() == 0 and not value.requires_grad for value in scalars.values())


# ------------------------------------------------------------------------------------ end to end
def test_run_writes_events_model_summary_and_video(pendulum_dataset, tmp_path, bcq):
    train(
        SCRIPT,
        pendulum_dataset,
        ["--total-steps", 200, "--eval-freq", 100, "--eval-episodes", 2, "--capture-video", "--seed", 3],
        tmp_path,
    )
    folder, summary = check_run_folder(
        tmp_path,
        SCRIPT,
        "Pendulum-v1",
        3,
        [100, 200],
        2,
        {"losses/vae_loss", "losses/critic_loss", "losses/actor_loss"},
    )
    # The saved model loads into the script's own classes and, evaluated on the same seeds, gives the same returns.
    policy = bcq.BCQPolicy(3, 1, np.zeros(1), np.ones(1), phi=0.05, layer_norm=summary["args"]["layer_norm"])
    policy.load_state_dict(torch.load(folder / f"{SCRIPT}.pt", weights_only=True))
    assert policy.action_low.tolist() == [-2.0] and policy.action_high.tolist() == [2.0]
    # The dataset's observation statistics travel with the model: act() takes raw observations.
    assert policy.obs_std.min() > 0.1 and not torch.equal(policy.obs_std, torch.ones(3))
    q_initial = lambda observations, actions: bcq.q_initial(policy, observations, actions)  # noqa: E731
    replay = bcq.evaluate(
        bcq.ActingPolicy(policy, 100), q_initial, "Pendulum-v1", 2, 3, 0.99, torch.device("cpu"), None
    )
    assert replay["returns"] == pytest.approx(summary["final_returns"], abs=1e-3)
    assert replay["mean_return"] == pytest.approx(summary["final_mean_return"], abs=1e-3)
    assert (
        list(replay)
        == ["mean_return", "std_return", "normalized_score", "q_initial", "discounted_return_initial", "returns"]
        and replay["normalized_score"] is None
    )


def test_learns_pendulum_from_a_noisy_controller(pendulum_dataset, tmp_path):
    # A uniform random policy gets about -1190, the data's episodes about -470, the controller about -126. BCQ
    # needs about 2500 steps to imitate the controller's sharp switch from pumping to braking (measured: -900 to
    # -1000 at 2000 steps, -160 to -230 at 3000, 2 seeds). The VAE's hidden layers are 256 wide instead of 750
    # only to halve the run's time (about 90 s instead of 190 s); at 750 it learns at the same pace in steps.
    summary = train(
        SCRIPT,
        pendulum_dataset,
        ["--total-steps", 3000, "--eval-freq", 3000, "--eval-episodes", 10, "--vae-hidden-dim", 256, "--no-save-model"],
        tmp_path,
    )
    assert summary["final_mean_return"] >= -400, summary["final_returns"]
