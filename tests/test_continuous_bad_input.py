"""bcq_continuous.py, cql_sac_continuous.py and td3_bc.py refuse bad input with a message that says what to do."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import assert_clean_failure, load_npz, run_algorithm
from dataset_io import save_dataset

SCRIPTS = ["bcq_continuous", "cql_sac_continuous", "td3_bc"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_missing_dataset_prints_the_command_that_makes_it(script, tmp_path):
    result = run_algorithm(script, ["--dataset", "datasets/Hopper-v5/noisy.npz"], cwd=tmp_path)
    assert_clean_failure(
        result, "does not exist", "python data_collection/collect_dataset.py --env-id Hopper-v5 --policy noisy"
    )


@pytest.mark.parametrize("script", SCRIPTS)
def test_discrete_dataset_is_refused_naming_the_discrete_scripts(script, pendulum_dataset, tmp_path):
    arrays, metadata = load_npz(pendulum_dataset)
    arrays["actions"] = (arrays["actions"][:, 0] > 0).astype(np.int64)
    save_dataset(tmp_path / "discrete.npz", arrays, metadata, overwrite=True)
    result = run_algorithm(script, ["--dataset", tmp_path / "discrete.npz"], cwd=tmp_path)
    assert_clean_failure(result, "discrete", "cql_discrete_lunarlander.py", "bcq_discrete.py")


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize(
    ("env_id", "fragments"),
    [
        (
            "MountainCarContinuous-v0",
            [
                "do not match",
                "obs_dim 3 and actions of shape (1,) in [[-2.0], [2.0]]",
                "observation shape (2,) and actions of shape (1,) in [[-1.0], [1.0]]",
            ],
        ),
        ("CartPole-v1", ["needs a Box action space"]),
    ],
)
def test_env_not_matching_dataset_prints_both(script, env_id, fragments, pendulum_dataset, tmp_path):
    result = run_algorithm(script, ["--dataset", pendulum_dataset, "--env-id", env_id], cwd=tmp_path)
    assert_clean_failure(result, *fragments)


@pytest.mark.parametrize("script", SCRIPTS)
def test_box_bounds_not_matching_the_env_are_refused(script, pendulum_dataset, tmp_path):
    arrays, metadata = load_npz(pendulum_dataset)
    metadata["action_space"]["low"], metadata["action_space"]["high"] = [-1.0], [1.0]
    save_dataset(tmp_path / "unit.npz", arrays, metadata, overwrite=True)
    result = run_algorithm(script, ["--dataset", tmp_path / "unit.npz"], cwd=tmp_path)
    assert_clean_failure(result, "do not match", "in [[-1.0], [1.0]]", "in [[-2.0], [2.0]]")


@pytest.mark.parametrize(
    ("script", "flags"),
    [
        ("bcq_continuous", ["--learning-rate", 1e10, "--total-steps", 2000, "--eval-freq", 2000]),
        ("cql_sac_continuous", ["--critic-lr", 1e10, "--total-steps", 500, "--eval-freq", 500, "--num-random", 2]),
        ("td3_bc", ["--critic-lr", 1e10, "--actor-lr", 1e10, "--total-steps", 2000, "--eval-freq", 2000]),
    ],
)
def test_diverging_loss_stops_with_the_step(script, flags, pendulum_dataset, tmp_path):
    # A learning rate of 1e10 throws the weights to about 1e30 within a few steps: squared, the losses overflow.
    result = run_algorithm(script, ["--dataset", pendulum_dataset, *flags], cwd=tmp_path)
    assert_clean_failure(result, "at gradient step", "last finite losses")
    assert not (tmp_path / "runs").exists()  # it failed before its first checkpoint: nothing is left
