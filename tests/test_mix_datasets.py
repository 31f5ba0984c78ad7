"""data_collection/mix_datasets.py: concatenation, merged metadata, refusal of datasets that do not fit."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import COLLECTOR, DESCRIBER, MIXER, load_npz, offline_env, run_script
from dataset_io import ARRAY_KEYS


@pytest.fixture(scope="module")
def datasets(hub_cache, tmp_path_factory):
    folder = tmp_path_factory.mktemp("mix")
    runs = {
        "expert": ["--env-id", "CartPole-v1", "--algo", "ppo", "--num-transitions", 300],
        "noisy": ["--env-id", "CartPole-v1", "--algo", "ppo", "--policy", "noisy", "--num-transitions", 200],
        "pendulum": ["--env-id", "Pendulum-v1", "--policy", "random", "--num-transitions", 100],
    }
    for name, args in runs.items():
        result = run_script(
            COLLECTOR, [*args, "--reference-episodes", 2, "--output", folder / f"{name}.npz"], offline_env(hub_cache)
        )
        assert result.returncode == 0, result.stderr
    return folder


def test_mix_concatenates_and_merges_metadata(hub_cache, datasets, tmp_path):
    output = tmp_path / "expert-noisy.npz"
    result = run_script(
        MIXER, [datasets / "expert.npz", datasets / "noisy.npz", "--output", output], offline_env(hub_cache)
    )
    assert result.returncode == 0, result.stderr
    mixed, metadata = load_npz(output)
    expert, expert_metadata = load_npz(datasets / "expert.npz")
    noisy, _ = load_npz(datasets / "noisy.npz")
    for key in ARRAY_KEYS:
        np.testing.assert_array_equal(mixed[key], np.concatenate([expert[key], noisy[key]]))
    assert metadata["num_transitions"] == 500 and metadata["env_id"] == "CartPole-v1"
    assert metadata["policy"] == "expert+noisy" and metadata["agent"] == "sb3/ppo-CartPole-v1"
    assert metadata["reference_returns"] == expert_metadata["reference_returns"]
    assert [source["policy"] for source in metadata["sources"]] == ["expert", "noisy"]


def test_mix_refuses_other_env_with_both_shapes(hub_cache, datasets, tmp_path):
    result = run_script(
        MIXER,
        [datasets / "expert.npz", datasets / "pendulum.npz", "--output", tmp_path / "x.npz"],
        offline_env(hub_cache),
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "CartPole-v1" in result.stderr and "Pendulum-v1" in result.stderr


def test_mix_refuses_mismatched_spaces_with_both_shapes(hub_cache, datasets, tmp_path):
    # Same env id, different spaces: a dataset relabelled by hand must still be refused.
    arrays, metadata = load_npz(datasets / "pendulum.npz")
    metadata["env_id"] = "CartPole-v1"
    np.savez_compressed(tmp_path / "relabelled.npz", **arrays, metadata=np.array(json.dumps(metadata)))
    result = run_script(
        MIXER,
        [datasets / "expert.npz", tmp_path / "relabelled.npz", "--output", tmp_path / "x.npz"],
        offline_env(hub_cache),
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "spaces differ" in result.stderr
    assert "'observation_shape': [4]" in result.stderr and "'observation_shape': [3]" in result.stderr


def test_mix_refuses_a_missing_file(hub_cache, datasets, tmp_path):
    result = run_script(
        MIXER, [datasets / "expert.npz", tmp_path / "nope.npz", "--output", tmp_path / "x.npz"], offline_env(hub_cache)
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "does not exist" in result.stderr and "collect_dataset.py" in result.stderr


def test_describe_lists_each_dataset(hub_cache, datasets):
    result = run_script(DESCRIBER, [datasets / "expert.npz", datasets / "pendulum.npz"], offline_env(hub_cache))
    assert result.returncode == 0, result.stderr
    rows = result.stdout.strip().splitlines()
    assert len(rows) == 4  # header, separator, one row per file
    assert rows[2].startswith("| `expert.npz` | CartPole-v1 | expert | `sb3/ppo-CartPole-v1` | 300 |")
    assert rows[3].startswith("| `pendulum.npz` | Pendulum-v1 | random | - | 100 |")
