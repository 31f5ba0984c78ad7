"""algorithms/tabular_maze.py: the three backups by hand on a corridor, the two questions' answers, bad flags."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import assert_clean_failure, load_algorithm, run_algorithm, run_folder


@pytest.fixture(scope="module")
def maze():
    return load_algorithm("tabular_maze")


# A corridor of three cells: A -> B pays 0, B -> C pays 1 and ends the episode. Every entry starts at 5.
A, B, C = (2, 2), (2, 3), (2, 4)
RIGHT = 3
CORRIDOR = [(A, RIGHT, 0.0, B, False), (B, RIGHT, 1.0, C, True)]


def sweeps(maze, method, count, **flags):
    args = maze.Args(method=method, init_q=5.0, gamma=0.9, **flags)
    held = maze.data_actions(CORRIDOR)
    q = np.full((maze.ROWS, maze.COLUMNS, 4), 5.0)
    for _ in range(count):
        q = maze.backup(q, CORRIDOR, held, args)
    return q


def test_q_backs_up_the_untried_actions_initial_value(maze):
    q = sweeps(maze, "q", 2)
    assert q[B][RIGHT] == pytest.approx(1.0)  # the end: y = r
    assert q[A][RIGHT] == pytest.approx(0.9 * 5.0)  # max over B's actions: the untried ones keep 5
    assert np.all(np.delete(q[A], RIGHT) == 5.0) and np.all(np.delete(q[B], RIGHT) == 5.0)


def test_bcq_backs_up_only_the_data_actions(maze):
    assert sweeps(maze, "bcq", 1)[A][RIGHT] == pytest.approx(0.9 * 5.0)  # B's data action before its backup
    assert sweeps(maze, "bcq", 2)[A][RIGHT] == pytest.approx(0.9 * 1.0)


def test_cql_takes_one_gradient_step_of_the_penalised_loss(maze):
    # Step 1 / (1 + alpha / 2) = 2/3. In B: Bellman error 5 - 1 on the data's action, softmax 1/4 each, minus the
    # data's action: gradient [1/4, 1/4, 1/4, 4 + 1/4 - 1]. In A: y = 0.9 * 5, error 0.5: [1/4, 1/4, 1/4, -1/4].
    q = sweeps(maze, "cql", 1, cql_alpha=1.0)
    np.testing.assert_allclose(q[B], 5.0 - np.array([0.25, 0.25, 0.25, 3.25]) / 1.5)
    np.testing.assert_allclose(q[A], 5.0 - np.array([0.25, 0.25, 0.25, -0.25]) / 1.5)


def run_maze(tmp_path, *flags):
    tmp_path.mkdir(exist_ok=True)
    result = run_algorithm("tabular_maze", list(flags), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    folder = run_folder(tmp_path)
    return folder, json.loads((folder / "summary.json").read_text()), result.stdout


def test_optimistic_q_leaves_the_data_and_earns_less(tmp_path):
    folder, summary, stdout = run_maze(tmp_path, "--method", "q", "--init-q", 20)
    assert folder.name.startswith("maze__q__x20__1__") and (folder / "q_table.png").stat().st_size > 10_000
    assert summary["steps_outside_data"] >= 1 and summary["q_start"] >= 20
    assert summary["greedy_return"] < summary["data_best_return"] == 12 == summary["optimal_return"]
    assert "[S" in stdout  # the text grid marks the start, a data cell


def test_pessimistic_q_stays_on_the_data_and_earns_its_best(tmp_path):
    folder, summary, _ = run_maze(tmp_path, "--method", "q", "--init-q", -1)
    assert folder.name.startswith("maze__q__x-1__1__")
    assert summary["steps_outside_data"] == 0 and summary["greedy_return"] == summary["data_best_return"] == 12


@pytest.mark.parametrize("method", ["bcq", "cql"])
def test_bcq_and_cql_stay_on_the_data_from_an_optimistic_start(tmp_path, method):
    _, summary, _ = run_maze(tmp_path, "--method", method, "--init-q", 20, "--no-plot")
    assert summary["steps_outside_data"] == 0 and summary["greedy_return"] == summary["data_best_return"] == 12
    assert summary["q_start"] <= 12 + 1e-6  # neither believes more than the data can earn


def test_noisy_data_is_seeded(tmp_path):
    flags = ("--data", "noisy", "--episodes", 30, "--noise", 0.5, "--seed", 3, "--no-plot")
    _, first, _ = run_maze(tmp_path / "a", *flags)
    _, again, _ = run_maze(tmp_path / "b", *flags)
    _, paths, _ = run_maze(tmp_path / "c", "--no-plot")
    assert first["data_transitions"] == again["data_transitions"] != paths["data_transitions"]
    assert first["greedy_path"] == again["greedy_path"] and first["q_start"] == again["q_start"]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--gamma", 1.5], "--gamma must be in [0, 1]"),
        (["--iterations", 0], "--iterations and --episodes must be at least 1"),
        (["--noise", 2], "--noise must be in [0, 1]"),
        (["--cql-alpha", -1], "--cql-alpha must be a finite number at least 0"),
        (["--init-q", "nan"], "--init-q must be a finite number"),
    ],
)
def test_bad_flags_are_refused_in_one_line(tmp_path, flags, message):
    result = run_algorithm("tabular_maze", flags, cwd=tmp_path)
    assert_clean_failure(result, message, returncode=2)
    assert not (tmp_path / "runs").exists()


def test_every_numeric_flag_is_accepted_or_refused_in_one_line(maze, capsys):
    from dataclasses import fields

    numeric = [f"--{field.name.replace('_', '-')}" for field in fields(maze.Args) if field.type in (int, float)]
    assert len(numeric) >= 6
    for flag in numeric:
        for value in ("nan", "inf", "-inf", "0", "-1"):
            capsys.readouterr()
            try:
                maze.read_flags([flag, value])
            except SystemExit as stop:
                lines = capsys.readouterr().err.strip().splitlines()
                assert stop.code == 2 and len(lines) == 1 and flag in lines[0], (flag, value, lines)
            else:  # 0 is a valid discount, initial value, penalty, noise and seed; -1 an initial value
                assert (flag, value) in {
                    (f, "0") for f in ("--gamma", "--init-q", "--cql-alpha", "--noise", "--seed")
                } | {("--init-q", "-1")}, (flag, value)
