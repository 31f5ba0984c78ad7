"""Writing datasets: stale temporary files of killed writers are cleaned up, and files get the user's umask."""

from __future__ import annotations

import os
import subprocess
import time

import numpy as np
import pytest
from dataset_io import save_dataset


def tiny_dataset() -> tuple[dict[str, np.ndarray], dict]:
    arrays = {
        "observations": np.zeros((3, 2), np.float32),
        "actions": np.zeros(3, np.int64),
        "rewards": np.ones(3, np.float32),
        "next_observations": np.zeros((3, 2), np.float32),
        "terminations": np.array([False, False, True]),
        "truncations": np.zeros(3, bool),
        "episode_returns": np.array([3.0], np.float32),
    }
    metadata = {
        "env_id": "CartPole-v1",
        "policy": "test",
        "agent": None,
        "noise": None,
        "seed": 0,
        "num_transitions": 3,
        "gymnasium_version": "test",
        "created_by": "tests",
        "reference_returns": {"random": 0.0, "expert": 1.0},
    }
    return arrays, metadata


def dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_stale_temporaries_of_dead_writers_are_removed(tmp_path):
    output = tmp_path / "x.npz"
    dead, alive = dead_pid(), os.getpid()
    stale = [
        tmp_path / f".x.npz.{dead}.abc123.tmp",
        tmp_path / f".x.npz.{dead}.abc123.probe",
        tmp_path / ".x.npz.old_one.tmp",  # no PID in the name, and two hours old
    ]
    kept = [
        tmp_path / f".x.npz.{alive}.abc123.tmp",  # a writer still at work
        tmp_path / ".x.npz.new_one.tmp",  # no PID in the name and recent: it may belong to a running writer
        tmp_path / f".x.npz.1.npz.{dead}.abc123.tmp",  # another output's (x.npz.1.npz)
        tmp_path / "notes.txt",
    ]
    for path in stale + kept:
        path.write_bytes(b"")
    two_hours_ago = time.time() - 7200
    os.utime(tmp_path / ".x.npz.old_one.tmp", (two_hours_ago, two_hours_ago))

    save_dataset(output, *tiny_dataset(), overwrite=False)
    assert sorted(tmp_path.iterdir()) == sorted([output, *kept])


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_saved_dataset_has_the_mode_of_the_umask(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        save_dataset(tmp_path / "x.npz", *tiny_dataset(), overwrite=False)
    finally:
        os.umask(previous)
    assert (tmp_path / "x.npz").stat().st_mode & 0o777 == mode
