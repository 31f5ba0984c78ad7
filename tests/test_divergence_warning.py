"""The critic's Q(s0) against the returns the data's rewards allow: every script with a critic says once, in one line,
when its estimate leaves them, records the step in summary.json, and keeps running."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import load_algorithm, load_npz, run_algorithm
from dataset_io import save_dataset

CRITIC_SCRIPTS = ["td3_bc", "iql", "cql_sac_continuous", "bcq_continuous", "bcq_discrete", "cql_discrete_lunarlander"]


@pytest.fixture(scope="module")
def modules():
    return {script: load_algorithm(script) for script in [*CRITIC_SCRIPTS, "bc"]}


def test_the_return_range_by_hand(modules):
    return_range = modules["td3_bc"].return_range
    assert return_range(torch.tensor([-2.0, 1.0, 3.0]), 0.9) == pytest.approx((-20.0, 30.0))
    assert return_range(torch.tensor([1.0, 3.0]), 0.99) == pytest.approx((0.0, 300.0))  # an episode may end at once
    assert return_range(torch.tensor([-16.3, -0.1]), 0.5) == pytest.approx((-32.6, 0.0))
    assert return_range(torch.tensor([-1.0, 1.0]), 1.0) == (-math.inf, math.inf)
    assert return_range(torch.tensor([0.5]), 0.0) == pytest.approx((0.0, 0.5))


def evaluations_of(module, q_values: list[float], rewards: list[float], monkeypatch, capsys) -> tuple[object, str]:
    """A run's evaluations, each returning the next Q(s0) of q_values, on data with these rewards (gamma 0.9)."""
    answers = iter(q_values)

    def evaluate(acting, q_initial, *args, **kwargs):  # as evaluate(): a Q(s0) where the script has a critic
        record = {"mean_return": 1.0, "std_return": 0.0, "discounted_return_initial": 1.0}
        return {**record, "q_initial": next(answers)} if q_initial is not None else record

    monkeypatch.setattr(module, "evaluate", evaluate)
    run = SimpleNamespace(args=module.Args(gamma=0.9), metadata={}, run_dir=Path("runs/none"), acting=None)
    run.q_initial = None if module.__name__ == "bc" else lambda observations, actions: observations
    run.env_id, run.device, run.eval_time, run.sps = "CartPole-v1", torch.device("cpu"), 0.0, 0.0
    run.start_time, run.evaluations, run.critic_diverged_at_step = 0.0, [], None
    run.return_range = module.return_range(torch.tensor(rewards), 0.9)
    run.writer = SimpleNamespace(add_scalar=lambda *args: None)
    run.check_divergence = lambda step, q: module.Run.check_divergence(run, step, q)
    capsys.readouterr()
    for step in range(1, len(q_values) + 1):
        module.Run.evaluate(run, step * 100)
    return run, capsys.readouterr().out


@pytest.mark.parametrize("script", CRITIC_SCRIPTS)
def test_an_estimate_above_the_range_is_said_once_and_recorded(script, modules, monkeypatch, capsys):
    # Rewards in [-1, 2], gamma 0.9: returns in [-10, 20]; the warning waits for more than a tenth of 30 outside.
    run, out = evaluations_of(modules[script], [5.0, 22.9, 23.5, 1e7, 30.0], [-1.0, 2.0], monkeypatch, capsys)
    warnings = [line for line in out.splitlines() if line.startswith("warning:")]
    assert warnings == [
        "warning: at step 300 the critic's estimate of the first states, 23.5, is above any return the data's rewards "
        'allow (20): the critic is diverging; see "Reading the Q(s0) diagnostic" in README.md'
    ]
    assert run.critic_diverged_at_step == 300 and len(run.evaluations) == 5


@pytest.mark.parametrize("script", CRITIC_SCRIPTS)
def test_an_estimate_below_the_range_is_said_too(script, modules, monkeypatch, capsys):
    run, out = evaluations_of(modules[script], [-9.0, -14.0], [-1.0, 2.0], monkeypatch, capsys)
    assert "-14 is below any return the data's rewards allow (-10)" in out.replace(", -14,", " -14")
    assert run.critic_diverged_at_step == 200


@pytest.mark.parametrize("script", CRITIC_SCRIPTS)
def test_estimates_inside_the_range_say_nothing(script, modules, monkeypatch, capsys):
    run, out = evaluations_of(modules[script], [-12.9, 0.0, 22.9], [-1.0, 2.0], monkeypatch, capsys)
    assert "warning" not in out and run.critic_diverged_at_step is None


def test_a_critic_made_to_diverge_is_named_and_the_run_goes_on(pendulum_dataset, tmp_path):
    # Naive offline SAC (no conservative penalty) on 500 transitions of one action between unrelated states: the
    # actor climbs the critic's extrapolation to actions the data never took, and the targets feed it back. Every
    # reward is 1, so no return exceeds 1 / (1 - 0.99) = 100.
    arrays, metadata = load_npz(pendulum_dataset)
    arrays = {key: value[:500] for key, value in arrays.items() if key != "episode_returns"}
    rng = np.random.default_rng(0)
    arrays["observations"] = rng.normal(size=arrays["observations"].shape).astype(np.float32)
    arrays["next_observations"] = rng.normal(size=arrays["observations"].shape).astype(np.float32)
    arrays["actions"][:] = -0.85  # inside the bounds: the critic extrapolates to both sides of it
    arrays["rewards"][:] = 1.0
    arrays["terminations"][:], arrays["truncations"][:] = False, False
    arrays["episode_returns"] = np.zeros(0, dtype=np.float32)
    save_dataset(tmp_path / "narrow.npz", arrays, metadata, overwrite=True)
    flags = ["--cql-alpha", 0, "--bc-steps", 0, "--critic-lr", 3e-3, "--actor-lr", 3e-3, "--hidden-dim", 32]
    flags += ["--num-random", 2, "--total-steps", 1500, "--eval-freq", 250, "--eval-episodes", 1]
    result = run_algorithm("cql_sac_continuous", ["--dataset", tmp_path / "narrow.npz", *flags], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stdout.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "is above any return the data's rewards allow (100)" in warnings[0], result.stdout
    (run_dir,) = (tmp_path / "runs").iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["steps_done"] == 1500
    step = summary["critic_diverged_at_step"]
    (evaluation,) = [e for e in summary["evaluations"] if e["step"] == step]
    assert evaluation["q_initial"] > 110 and all(
        e["q_initial"] <= 110 for e in summary["evaluations"] if e["step"] < step
    )


def test_behaviour_cloning_has_no_critic_to_check(modules, monkeypatch, capsys):
    run, out = evaluations_of(modules["bc"], [1e9], [-1.0, 2.0], monkeypatch, capsys)
    assert "warning" not in out and run.critic_diverged_at_step is None
