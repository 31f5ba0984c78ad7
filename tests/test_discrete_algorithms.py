"""cql_discrete_lunarlander.py and bcq_discrete.py: their mathematics by hand, end-to-end runs, learning, bad input."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from conftest import assert_clean_failure, check_run_folder, load_algorithm, load_npz, run_algorithm, train
from dataset_io import save_dataset

SCRIPTS = ["cql_discrete_lunarlander", "bcq_discrete"]


@pytest.fixture(scope="module")
def cql():
    return load_algorithm("cql_discrete_lunarlander")


@pytest.fixture(scope="module")
def bcq():
    return load_algorithm("bcq_discrete")


# ------------------------------------------------------------------------------------ mathematics by hand
def test_cql_penalty_by_hand(cql):
    q_values = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    actions = torch.tensor([2, 0])
    state_1 = math.log(math.exp(1) + math.exp(2) + math.exp(3)) - 3.0
    state_2 = math.log(3.0) - 0.0
    assert cql.cql_penalty(q_values, actions).item() == pytest.approx((state_1 + state_2) / 2, abs=1e-6)


def test_dqn_and_double_dqn_targets_by_hand(cql):
    rewards, terminations = torch.tensor([1.0, -1.0]), torch.tensor([0.0, 1.0])
    next_q_target = torch.tensor([[1.0, 5.0, 2.0], [3.0, 0.0, 0.0]])
    next_q_online = torch.tensor([[3.0, 0.0, 1.0], [0.0, 9.0, 0.0]])
    # DQN: max of the target network; the terminal state does not bootstrap.
    assert cql.td_target(rewards, terminations, next_q_target, 0.9).tolist() == pytest.approx([1 + 0.9 * 5, -1.0])
    # Double DQN: the online network picks action 0, the target network values it at 1.
    double_dqn = cql.td_target(rewards, terminations, next_q_target, 0.9, next_q_online)
    assert double_dqn.tolist() == pytest.approx([1 + 0.9 * 1, -1.0])


def test_one_cql_update_takes_the_gradient_of_td_plus_cql_and_copies_the_target_every_frequency_steps(cql):
    torch.manual_seed(0)
    q_network, target_network = cql.QNetwork(3, 2, 8), cql.QNetwork(3, 2, 8)
    reference = copy.deepcopy(q_network)
    optimizer = torch.optim.SGD(q_network.parameters(), lr=0.1)
    batch = {
        "observations": torch.randn(6, 3),
        "actions": torch.tensor([0, 1, 1, 0, 1, 0]),
        "rewards": torch.randn(6),
        "next_observations": torch.randn(6, 3),
        "terminations": (torch.arange(6) % 3 == 0).float(),
    }
    args = cql.AlgorithmArgs(cql_alpha=0.5, target_network_frequency=2, tau=1.0)
    # Computed apart: the Huber TD loss to r + gamma (1 - d) max_a Q'(s', a), plus alpha (logsumexp Q - Q(s, a_data)).
    with torch.no_grad():
        targets = (
            batch["rewards"]
            + 0.99 * (1 - batch["terminations"]) * target_network(batch["next_observations"]).max(dim=1).values
        )
    q_values = reference(batch["observations"])
    q_data = q_values[torch.arange(6), batch["actions"]]
    td_loss = torch.nn.functional.smooth_l1_loss(q_data, targets)
    cql_loss = (torch.logsumexp(q_values, dim=1) - q_data).mean()
    (td_loss + 0.5 * cql_loss).backward()
    old_target = [parameter.clone() for parameter in target_network.parameters()]
    scalars = cql.update(1, batch, q_network, target_network, optimizer, args)
    assert scalars["losses/td_loss"].item() == pytest.approx(td_loss.item(), rel=1e-6)
    assert scalars["losses/cql_loss"].item() == pytest.approx(cql_loss.item(), rel=1e-6)
    assert scalars["losses/loss"].item() == pytest.approx(td_loss.item() + 0.5 * cql_loss.item(), rel=1e-6)
    for new, old in zip(q_network.parameters(), reference.parameters()):  # one SGD step down that gradient
        torch.testing.assert_close(new, old - 0.1 * old.grad)
    # Step 1 is not a multiple of --target-network-frequency 2: the target stays; step 2 copies the online network.
    assert all(torch.equal(a, b) for a, b in zip(old_target, target_network.parameters()))
    cql.update(2, batch, q_network, target_network, optimizer, args)
    assert all(torch.equal(a, b) for a, b in zip(q_network.parameters(), target_network.parameters()))


def test_bcq_mask_and_target_by_hand(bcq):
    # Relative probabilities G(a|s) / max G: state 1 -> [1, 0.5, 0.2], state 2 -> [0.25, 1, 0.35].
    imitation_logits = torch.log(torch.tensor([[1.0, 0.5, 0.2], [0.25, 1.0, 0.35]])) + torch.tensor([[2.0], [-1.0]])
    allowed = bcq.allowed_actions(imitation_logits, 0.3)
    assert allowed.tolist() == [[True, True, False], [False, True, True]]
    next_q_online = torch.tensor([[1.0, 4.0, 9.0], [5.0, 1.0, 2.0]])
    values, actions = bcq.masked_greedy(next_q_online, allowed)
    assert actions.tolist() == [1, 2] and values.tolist() == [4.0, 2.0]  # the best Q among allowed actions only
    next_q_target = torch.tensor([[10.0, 20.0, 30.0], [7.0, 8.0, 6.0]])
    rewards, terminations = torch.tensor([1.0, 0.5]), torch.tensor([0.0, 0.0])
    target = bcq.bcq_target(rewards, terminations, next_q_online, next_q_target, imitation_logits, 0.9, 0.3)
    assert target.tolist() == pytest.approx([1 + 0.9 * 20, 0.5 + 0.9 * 6])
    # Threshold 0 allows every action: the Double DQN target. A terminal state does not bootstrap.
    target = bcq.bcq_target(rewards, torch.tensor([0.0, 1.0]), next_q_online, next_q_target, imitation_logits, 0.9, 0.0)
    assert target.tolist() == pytest.approx([1 + 0.9 * 30, 0.5])
    # Threshold 1 allows only the most likely action: behaviour cloning's choice.
    target = bcq.bcq_target(rewards, terminations, next_q_online, next_q_target, imitation_logits, 0.9, 1.0)
    assert target.tolist() == pytest.approx([1 + 0.9 * 10, 0.5 + 0.9 * 8])


def test_one_bcq_update_takes_the_gradient_of_its_three_losses_and_averages_the_target(bcq):
    torch.manual_seed(0)
    network, target_network = bcq.BCQNetwork(3, 3, 8), bcq.BCQNetwork(3, 3, 8)
    reference, old_target = copy.deepcopy(network), copy.deepcopy(target_network)
    optimizer = torch.optim.SGD(network.parameters(), lr=0.1)
    batch = {
        "observations": torch.randn(6, 3),
        "actions": torch.tensor([0, 1, 2, 0, 1, 2]),
        "rewards": torch.randn(6),
        "next_observations": torch.randn(6, 3),
        "terminations": (torch.arange(6) % 3 == 0).float(),
    }
    args = bcq.AlgorithmArgs(threshold=0.7, logit_penalty=0.5, tau=0.5)
    # Computed apart: a' is the online network's best action among those with softmax probability >= 0.7 of the
    # likeliest's, valued by the target network; the loss adds the cross-entropy and 0.5 mean(logits ** 2).
    with torch.no_grad():
        next_q, next_logits = reference(batch["next_observations"])
        probabilities = next_logits.softmax(dim=1)
        allowed = probabilities / probabilities.max(dim=1, keepdim=True).values >= 0.7
        next_actions = torch.where(allowed, next_q, -math.inf).argmax(dim=1)
        assert (next_actions != next_q.argmax(dim=1)).any()  # the mask changes some choices
        next_value = old_target.q_values(batch["next_observations"])[torch.arange(6), next_actions]
        targets = batch["rewards"] + 0.99 * (1 - batch["terminations"]) * next_value
    q_values, logits = reference(batch["observations"])
    td_loss = torch.nn.functional.smooth_l1_loss(q_values[torch.arange(6), batch["actions"]], targets)
    imitation_loss = -logits.log_softmax(dim=1)[torch.arange(6), batch["actions"]].mean()
    loss = td_loss + imitation_loss + 0.5 * logits.pow(2).mean()
    loss.backward()
    scalars = bcq.update(1, batch, network, target_network, optimizer, args)
    assert scalars["losses/td_loss"].item() == pytest.approx(td_loss.item(), rel=1e-5)
    assert scalars["losses/imitation_loss"].item() == pytest.approx(imitation_loss.item(), rel=1e-5)
    assert scalars["losses/loss"].item() == pytest.approx(loss.item(), rel=1e-5)
    for new, old in zip(network.parameters(), reference.parameters()):  # one SGD step down that gradient
        torch.testing.assert_close(new, old - 0.1 * old.grad)
    # --target-network-frequency 1: the target moves half way (tau 0.5) to the updated online network at every step.
    for new, old, online in zip(target_network.parameters(), old_target.parameters(), network.parameters()):
        torch.testing.assert_close(new, old + 0.5 * (online - old))


@pytest.mark.parametrize("script", SCRIPTS)
def test_target_update_with_tau_1_is_an_exact_copy(script, cql, bcq, capsys):
    module = cql if script == SCRIPTS[0] else bcq
    online, target = [torch.randn(64, 64) * 1e3], [torch.randn(64, 64) * 1e-3]
    torch._foreach_lerp_(target, online, 1.0)  # the update both scripts make every --target-network-frequency steps
    assert torch.equal(target[0], online[0])
    with pytest.raises(SystemExit):
        module.validate_args(module.Args(target_network_frequency=0))
    assert "--target-network-frequency must be at least 1" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ end to end
@pytest.mark.parametrize("script", SCRIPTS)
def test_run_writes_events_model_summary_and_video(script, cartpole_dataset, tmp_path, cql, bcq):
    train(
        script,
        cartpole_dataset,
        ["--total-steps", 300, "--eval-freq", 150, "--eval-episodes", 2, "--capture-video", "--seed", 3],
        tmp_path,
    )
    folder, _ = check_run_folder(tmp_path, script, "CartPole-v1", 3, [150, 300], 2, {"losses/td_loss"})
    state_dict = torch.load(folder / f"{script}.pt", weights_only=True)
    network = cql.QNetwork(4, 2, 256) if script == SCRIPTS[0] else bcq.BCQNetwork(4, 2, 256)
    network.load_state_dict(state_dict)


@pytest.mark.parametrize(("script", "steps"), [("cql_discrete_lunarlander", 6000), ("bcq_discrete", 4000)])
def test_learns_cartpole_from_a_noisy_controller(script, steps, cartpole_dataset, tmp_path):
    summary = train(
        script,
        cartpole_dataset,
        ["--total-steps", steps, "--eval-freq", steps, "--eval-episodes", 5, "--no-save-model"],
        tmp_path,
    )
    assert summary["final_mean_return"] >= 400, summary["final_returns"]


# ------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("script", SCRIPTS)
def test_missing_dataset_prints_the_command_that_makes_it(script, tmp_path):
    result = run_algorithm(script, ["--dataset", "datasets/LunarLander-v3/noisy.npz"], cwd=tmp_path)
    assert_clean_failure(
        result, "does not exist", "python data_collection/collect_dataset.py --env-id LunarLander-v3 --policy noisy"
    )


@pytest.mark.parametrize("script", SCRIPTS)
def test_box_action_dataset_is_refused(script, cartpole_dataset, tmp_path):
    arrays, metadata = load_npz(cartpole_dataset)
    arrays["actions"] = arrays["actions"].astype(np.float32).reshape(-1, 1)
    save_dataset(tmp_path / "box.npz", arrays, metadata, overwrite=True)
    result = run_algorithm(script, ["--dataset", tmp_path / "box.npz"], cwd=tmp_path)
    assert_clean_failure(result, "continuous (Box) actions", "cql_sac_continuous.py")


@pytest.mark.parametrize("script", SCRIPTS)
def test_env_not_matching_dataset_prints_both(script, cartpole_dataset, tmp_path):
    result = run_algorithm(script, ["--dataset", cartpole_dataset, "--env-id", "Acrobot-v1"], cwd=tmp_path)
    assert_clean_failure(result, "do not match", "obs_dim 4 and 2 actions", "(6,) and 3 actions")


@pytest.mark.parametrize(
    ("script", "extra"), [("cql_discrete_lunarlander", ["--td-loss", "mse"]), ("bcq_discrete", [])]
)
def test_diverging_loss_stops_with_the_step(script, extra, cartpole_dataset, tmp_path):
    # A learning rate of 1e10 throws the weights to about 1e30 within a few steps: squared, the loss overflows.
    result = run_algorithm(
        script,
        ["--dataset", cartpole_dataset, "--learning-rate", 1e10, "--total-steps", 2000, "--eval-freq", 2000, *extra],
        cwd=tmp_path,
    )
    assert_clean_failure(result, "at gradient step", "last finite losses")
