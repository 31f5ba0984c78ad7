"""cql_discrete_lunarlander.py and bcq_discrete.py: their mathematics by hand, end-to-end runs, learning, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import (
    assert_clean_failure, check_run_folder, load_algorithm, load_npz, run_algorithm, train,
)

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
    train(script, cartpole_dataset, ["--total-steps", 300, "--eval-freq", 150, "--eval-episodes", 2, "--capture-video",
                                     "--seed", 3], tmp_path)
    folder, _ = check_run_folder(tmp_path, script, "CartPole-v1", 3, [150, 300], 2, {"losses/td_loss"})
    state_dict = torch.load(folder / f"{script}.pt", weights_only=True)
    network = cql.QNetwork(4, 2, 256) if script == SCRIPTS[0] else bcq.BCQNetwork(4, 2, 256)
    network.load_state_dict(state_dict)


@pytest.mark.parametrize(("script", "steps"), [("cql_discrete_lunarlander", 6000), ("bcq_discrete", 4000)])
def test_learns_cartpole_from_a_noisy_controller(script, steps, cartpole_dataset, tmp_path):
    summary = train(script, cartpole_dataset, ["--total-steps", steps, "--eval-freq", steps, "--eval-episodes", 5,
                                               "--no-save-model"], tmp_path)
    assert summary["final_mean_return"] >= 400, summary["final_returns"]


# ------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("script", SCRIPTS)
def test_missing_dataset_prints_the_command_that_makes_it(script, tmp_path):
    result = run_algorithm(script, ["--dataset", "datasets/LunarLander-v3/noisy.npz"], cwd=tmp_path)
    assert_clean_failure(result, "does not exist",
                         "python data_collection/collect_dataset.py --env-id LunarLander-v3 --policy noisy")


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


@pytest.mark.parametrize(("script", "extra"),
                         [("cql_discrete_lunarlander", ["--td-loss", "mse"]), ("bcq_discrete", [])])
def test_diverging_loss_stops_with_the_step(script, extra, cartpole_dataset, tmp_path):
    # A learning rate of 1e10 throws the weights to about 1e30 within a few steps: squared, the loss overflows.
    result = run_algorithm(script, ["--dataset", cartpole_dataset, "--learning-rate", 1e10, "--total-steps", 2000,
                                    "--eval-freq", 2000, *extra], cwd=tmp_path)
    assert_clean_failure(result, "at gradient step", "last finite losses")
