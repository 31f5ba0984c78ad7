"""Offline RL in a table: value extrapolation on a 6 x 10 maze, with Q-iteration, tabular BCQ and tabular CQL.

Entering a cell pays its reward (once an episode); S = (5, 0) starts, (0, 9), a negative cell and (5, 8) end an
episode, 50 steps at most. The data (*) is two paths: S to (1, 9) and (0, 9), 5 + 7 = 12, and a branch from (3, 6)
to (5, 8) worth 0. Every Q-table entry starts at x (--init-q); dynamic programming runs on the data alone:
    -5  0 -2  0  0 -1  0  0  0 *7        q:   Q(s, a) <- r + gamma * max_a' Q(s', a')            (data's s, a only)
     0  0  0  0  0  0  0  0  *  *5       bcq: Q(s, a) <- r + gamma * max_{a' in data(s')} Q(s', a')
     0  0  0  0  0  0  *  *  *  0             and acts only with the data's actions where it has any
     0  0  0  0  *  *  *  0  0 -4        cql: q's target y, and a gradient step on the penalised loss
     0  *  *  *  *  0  *  *  0  0             (Q(s, a) - y)^2 / 2 + alpha * (logsumexp_a' Q(s, a') - Q(s, a))
     S  *  0  0  0  0  0  *  *  -2
Tabular BCQ: Fujimoto et al. (2019, https://arxiv.org/abs/1812.02900, section 4.1); CQL's penalty: Kumar et al.
(2020, https://arxiv.org/abs/2006.04779, eq. 4).

    python algorithms/tabular_maze.py --method q --init-q -1   # then --init-q 20, --method bcq, --method cql

What happens with x = -1? The untried actions keep -1, below all the data earns: the greedy policy follows the
data to (0, 9) and earns 12, the data's best (greedy return 12, 0 steps off the data).
And with x = 20? Untried actions keep 20, above anything real; (1, 9)'s back up 5 + 20 = 25 along the path
(Q(start) 25). The greedy policy follows the data to (1, 9), leaves it for cells it knows nothing of, loops and
ends with 5 (37 steps off the data). BCQ, never maximising over untried actions, and CQL, pushing them down,
keep it on the data at x = 20 and earn 12. The picture: <run folder>/q_table.png.
"""

import contextlib
import io
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, NoReturn, Optional

import numpy as np
import tyro

REWARDS = np.array(
    [
        [-5, 0, -2, 0, 0, -1, 0, 0, 0, 7],
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 5],
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 0, 0, 0, -4],
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 0, 0, 0, -2],
    ],
    dtype=float,
)
ROWS, COLUMNS = REWARDS.shape
START, GOAL, SIDE_END = (5, 0), (0, 9), (5, 8)
MAX_STEPS = 50
ACTIONS = ((-1, 0), (1, 0), (0, -1), (0, 1))  # up, down, left, right: also the order that breaks ties
ACTION_NAMES = ("up", "down", "left", "right")
MAIN_PATH = [(5, 0), (5, 1), (4, 1), (4, 2), (4, 3), (4, 4), (3, 4), (3, 5), (3, 6), (2, 6), (2, 7), (2, 8)]
MAIN_PATH += [(1, 8), (1, 9), (0, 9)]
SIDE_BRANCH = MAIN_PATH[: MAIN_PATH.index((3, 6)) + 1] + [(4, 6), (4, 7), (5, 7), (5, 8)]


@dataclass
class Args:
    method: Literal["q", "bcq", "cql"] = "q"
    """q: Q-iteration on the data; bcq: the max and the policy only over the data's actions; cql: CQL's penalty"""
    init_q: float = 20.0
    """x, the initial value of every Q-table entry (the two cases of the docstring's questions: -1 and 20)"""
    gamma: float = 1.0
    """discount (1: returns are sums of rewards)"""
    cql_alpha: float = 1.0
    """cql: weight of the penalty logsumexp_a Q(s, a) - Q(s, a_data)"""
    iterations: int = 2000
    """sweeps over the data: a Bellman backup of every data transition each (a gradient step for cql)"""
    data: Literal["paths", "noisy"] = "paths"
    """paths: the two behaviour paths of the docstring; noisy: episodes of the main path's actions with random actions
    (their loops pay a cell only on the first trip, which a Q-table of cells averages: take --gamma below 1)"""
    episodes: int = 20
    """noisy data: number of behaviour episodes"""
    noise: float = 0.3
    """noisy data: probability of a uniform random action at each step (off the main path, always random)"""
    seed: int = 1
    """seed of the noisy data (the paths and the methods draw no random numbers)"""
    plot: bool = True
    """draw the Q-table, the data and the greedy path to <run folder>/q_table.png"""


def fail(message: str) -> NoReturn:
    """Bad input: one line on stderr and exit status 2, before anything is written."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def read_flags(argv: Optional[list[str]] = None) -> Args:
    """The checked flags; tyro's error box becomes one line."""
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            args = tyro.cli(Args, args=argv, description=__doc__)
    except SystemExit as stop:
        if stop.code:
            lines = [line.strip("│╭╮╰╯─ ") for line in captured.getvalue().splitlines()] + [""]
            message = " ".join(lines[1 : lines.index("", 1)]).rstrip(".") or "the flags could not be read"
            for python_words, kind in (
                ("invalid literal for int() with base 10", "a whole number"),
                ("could not convert string to float", "a number"),
            ):
                message = message.replace(f": {python_words}: ", f" takes {kind}, got ").replace("Error parsing ", "")
            fail(f"{message}; see --help")
        raise
    check_flags(args)
    return args


def check_flags(args: Args) -> None:
    if args.seed < 0:
        fail(f"--seed must be at least 0, got {args.seed}")
    if not 0.0 <= args.gamma <= 1.0:
        fail(f"--gamma must be in [0, 1], got {args.gamma}")
    if not np.isfinite(args.init_q):
        fail(f"--init-q must be a finite number, got {args.init_q}")
    if not 0.0 <= args.cql_alpha < np.inf:
        fail(f"--cql-alpha must be a finite number at least 0, got {args.cql_alpha}")
    if args.iterations < 1 or args.episodes < 1:
        fail(f"--iterations and --episodes must be at least 1, got {args.iterations} and {args.episodes}")
    if not 0.0 <= args.noise <= 1.0:
        fail(f"--noise must be in [0, 1], got {args.noise}")


# ------------------------------------------------------------------------------------------------- the maze
def move(cell: tuple[int, int], action: int) -> tuple[int, int]:
    """The cell an action leads to; a move off the grid stays in place."""
    row, column = cell[0] + ACTIONS[action][0], cell[1] + ACTIONS[action][1]
    return (row, column) if 0 <= row < ROWS and 0 <= column < COLUMNS else cell


def ends_episode(cell: tuple[int, int]) -> bool:
    return cell in (GOAL, SIDE_END) or REWARDS[cell] < 0


def play(policy, max_steps: int = MAX_STEPS) -> tuple[list[tuple[int, int]], list[int], float]:
    """Play policy(cell, step) -> action from the start: the cells visited, the actions and the real return, each
    cell's reward paid the first time the episode enters it."""
    cells, actions, visited, total = [START], [], {START}, 0.0
    for step in range(max_steps):
        action = policy(cells[-1], step)
        cell = move(cells[-1], action)
        total += REWARDS[cell] if cell not in visited else 0.0
        visited.add(cell)
        cells.append(cell)
        actions.append(action)
        if ends_episode(cell):
            break
    return cells, actions, total


def optimal_return() -> float:
    """The maze's true optimum: dynamic programming over (cell, the rewarding cells already entered, steps left),
    exact because only the cells with a reward make the first-visit rule matter."""
    paying = [tuple(cell) for cell in np.argwhere(REWARDS != 0)]
    best: dict = {}

    def value(cell, paid: frozenset, left: int) -> float:
        if left == 0:
            return 0.0
        key = (cell, paid, left)
        if key not in best:
            outcomes = []
            for action in range(len(ACTIONS)):
                after = move(cell, action)
                reward = REWARDS[after] if after in paying and after not in paid else 0.0
                rest = (
                    0.0 if ends_episode(after) else value(after, paid | {after} if after in paying else paid, left - 1)
                )
                outcomes.append(reward + rest)
            best[key] = max(outcomes)
        return best[key]

    return value(START, frozenset(), MAX_STEPS)


# ------------------------------------------------------------------------------------------------- the data
def episode_transitions(cells: list[tuple[int, int]], actions: list[int]) -> list[tuple]:
    """(cell, action, reward, next cell, terminal) of each step of an episode, rewards paid on the first entry."""
    transitions, visited = [], {cells[0]}
    for cell, action, after in zip(cells[:-1], actions, cells[1:]):
        transitions.append((cell, action, REWARDS[after] if after not in visited else 0.0, after, ends_episode(after)))
        visited.add(after)
    return transitions


def path_transitions(path: list[tuple[int, int]]) -> list[tuple]:
    """The transitions of walking a path of neighbouring cells."""
    actions = [next(a for a in range(len(ACTIONS)) if move(cell, a) == after) for cell, after in zip(path, path[1:])]
    return episode_transitions(path, actions)


def noisy_transitions(episodes: int, noise: float, rng: np.random.Generator) -> list[tuple]:
    """Episodes of a behaviour that takes the main path's action on the main path, and a uniform random action
    with probability `noise` there and always elsewhere."""
    on_path = {cell: action for cell, action, *_ in path_transitions(MAIN_PATH)}

    def behaviour(cell, step):
        if cell in on_path and rng.random() >= noise:
            return on_path[cell]
        return int(rng.integers(len(ACTIONS)))

    transitions = []
    for _ in range(episodes):
        cells, actions, _ = play(behaviour)
        transitions += episode_transitions(cells, actions)
    return transitions


def data_actions(transitions: list[tuple]) -> np.ndarray:
    """[rows, columns, actions] booleans: which actions the data holds in each cell."""
    held = np.zeros((ROWS, COLUMNS, len(ACTIONS)), dtype=bool)
    for cell, action, *_ in transitions:
        held[cell][action] = True
    return held


# ------------------------------------------------------------------------------------------------- the methods
def targets(q: np.ndarray, transitions: list[tuple], held: np.ndarray, method: str, gamma: float) -> np.ndarray:
    """y = r + gamma * max over the next cell's actions (bcq: only those the data holds there) for each transition;
    y = r where the transition ends the episode."""
    values = []
    for _, _, reward, after, terminal in transitions:
        allowed = held[after] if method == "bcq" and held[after].any() else np.ones(len(ACTIONS), dtype=bool)
        values.append(reward if terminal else reward + gamma * q[after][allowed].max())
    return np.array(values)


def backup(q: np.ndarray, transitions: list[tuple], held: np.ndarray, args: Args) -> np.ndarray:
    """One sweep. q and bcq: every data (s, a) becomes the mean target of its transitions (Q-iteration). cql: in
    every data cell s, one gradient step on the cell's loss, the mean over its transitions of
    (Q(s, a) - y)^2 / 2 + alpha * (logsumexp_a' Q(s, a') - Q(s, a)), of step 1 / (1 + alpha / 2): the loss's
    curvature is at most 1 + alpha / 2, so the step is stable for any alpha."""
    y = targets(q, transitions, held, args.method, args.gamma)
    sums, counts = np.zeros_like(q), np.zeros_like(q)
    for (cell, action, *_), target in zip(transitions, y):
        sums[cell][action] += target
        counts[cell][action] += 1
    new = q.copy()
    if args.method != "cql":
        new[counts > 0] = sums[counts > 0] / counts[counts > 0]
        return new
    cells = counts.sum(axis=-1) > 0
    share = counts[cells] / counts[cells].sum(axis=-1, keepdims=True)  # the data's action distribution per cell
    bellman = share * (q[cells] - np.divide(sums[cells], counts[cells], where=counts[cells] > 0, out=q[cells].copy()))
    logits = q[cells] - q[cells].max(axis=-1, keepdims=True)
    softmax = np.exp(logits) / np.exp(logits).sum(axis=-1, keepdims=True)
    new[cells] -= (bellman + args.cql_alpha * (softmax - share)) / (1.0 + args.cql_alpha / 2.0)
    return new


def greedy_policy(q: np.ndarray, held: np.ndarray, method: str):
    """The first action (up, down, left, right) of largest value; bcq chooses among the data's actions where the
    data holds any in the cell."""

    def act(cell, step=0):
        values = q[cell].copy()
        if method == "bcq" and held[cell].any():
            values[~held[cell]] = -np.inf
        return int(np.argmax(values))

    return act


def data_best_return(transitions: list[tuple], held: np.ndarray) -> float:
    """The best real return of a policy that takes only the data's actions: finite-horizon dynamic programming on
    the data's transitions (each (s, a) with its mean reward, 50 steps), then that policy played in the maze."""
    outcomes: dict = {}
    for cell, action, reward, after, terminal in transitions:
        outcomes.setdefault((cell, action), ([], after, terminal))[0].append(reward)
    value = np.zeros((MAX_STEPS + 1, ROWS, COLUMNS))
    choice = np.zeros((MAX_STEPS, ROWS, COLUMNS), dtype=int)
    for step in reversed(range(MAX_STEPS)):
        for cell in {cell for cell, _ in outcomes}:
            totals = np.full(len(ACTIONS), -np.inf)
            for action in np.flatnonzero(held[cell]):
                rewards, after, terminal = outcomes[cell, action]
                totals[action] = np.mean(rewards) + (0.0 if terminal else value[step + 1][after])
            choice[step][cell], value[step][cell] = int(np.argmax(totals)), totals.max()
    return play(lambda cell, step: choice[step][cell])[2]


# ------------------------------------------------------------------------------------------------- what it shows
def text_grid(q: np.ndarray, held: np.ndarray, policy, path: list[tuple[int, int]]) -> str:
    """Each cell's greedy action and its value; [ ] marks the cells where the data acts, * the greedy path."""
    arrows = "^v<>"
    lines = []
    for row in range(ROWS):
        cells = []
        for column in range(COLUMNS):
            cell = (row, column)
            mark = "S" if cell == START else ("*" if cell in path else " ")
            body = "  end " if ends_episode(cell) else f"{arrows[policy(cell)]}{q[cell][policy(cell)]:5.1f}"
            cells.append(f"[{mark}{body}]" if held[cell].any() else f" {mark}{body} ")
        lines.append("".join(cells))
    return "\n".join(lines)


def draw(q: np.ndarray, held: np.ndarray, policy, path, title: str, output: Path) -> None:
    """Heat map of the value of each cell's greedy action, the greedy arrows, the data's cells, the greedy path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = np.array(
        [[np.nan if ends_episode((r, c)) else q[r, c, policy((r, c))] for c in range(COLUMNS)] for r in range(ROWS)]
    )
    figure, axis = plt.subplots(figsize=(8, 5))
    image = axis.imshow(values, cmap="viridis")
    figure.colorbar(image, ax=axis, label="Q(s, greedy action)")
    for row in range(ROWS):
        for column in range(COLUMNS):
            cell = (row, column)
            if REWARDS[cell] != 0:
                colour = "black" if ends_episode(cell) else "white"
                axis.text(column, row + 0.32, f"{REWARDS[cell]:+g}", ha="center", color=colour, fontsize=8)
            if ends_episode(cell):
                axis.text(column, row - 0.1, "end", ha="center", color="black", fontsize=8)
                continue
            d_row, d_column = ACTIONS[policy(cell)]
            axis.arrow(
                column - 0.2 * d_column,
                row - 0.2 * d_row,
                0.3 * d_column,
                0.3 * d_row,
                head_width=0.12,
                color="white",
                length_includes_head=True,
            )
            if held[cell].any():
                axis.add_patch(plt.Rectangle((column - 0.5, row - 0.5), 1, 1, fill=False, edgecolor="red", lw=2))
    rows, columns = zip(*path)
    axis.plot(columns, rows, color="orange", lw=2.5, alpha=0.8, label="greedy path")
    axis.plot([], [], color="red", lw=2, label="cells the data acts in")
    axis.set_xticks(range(COLUMNS))
    axis.set_yticks(range(ROWS))
    axis.set_title(title)
    axis.legend(loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=2, fontsize=8)
    figure.tight_layout()
    figure.savefig(output, dpi=100)
    plt.close(figure)


def main() -> None:
    args = read_flags()
    started = time.time()
    if args.data == "paths":
        transitions = path_transitions(MAIN_PATH) + path_transitions(SIDE_BRANCH)
    else:
        transitions = noisy_transitions(args.episodes, args.noise, np.random.default_rng(args.seed))
    held = data_actions(transitions)
    q = np.full((ROWS, COLUMNS, len(ACTIONS)), args.init_q)
    for _ in range(args.iterations):
        q, before = backup(q, transitions, held, args), q
    change = float(np.abs(q - before).max())
    policy = greedy_policy(q, held, args.method)
    path, actions, greedy_return = play(policy)
    off_data = sum(not held[cell][action] for cell, action in zip(path, actions))
    start_actions = held[START] if args.method == "bcq" and held[START].any() else np.ones(len(ACTIONS), dtype=bool)
    summary = {
        "method": args.method,
        "init_q": args.init_q,
        "gamma": args.gamma,
        "q_start": float(q[START][start_actions].max()),
        "greedy_path": [list(cell) for cell in path],
        "greedy_return": greedy_return,
        "steps_outside_data": int(off_data),
        "data_best_return": data_best_return(transitions, held),
        "optimal_return": optimal_return(),
        "data_transitions": len(transitions),
        "last_sweep_change": change,
        "args": asdict(args),
    }
    run_dir = Path("runs") / f"maze__{args.method}__x{args.init_q:g}__{args.seed}__{int(time.time())}"
    run_dir.mkdir(parents=True, exist_ok=False)
    print(text_grid(q, held, policy, path))
    print(
        f"{args.method}, x = {args.init_q:g}: Q(start) {summary['q_start']:.2f}, greedy return "
        f"{greedy_return:g} ({off_data} of {len(actions)} steps off the data), best on the data "
        f"{summary['data_best_return']:g}, optimum {summary['optimal_return']:g}"
    )
    if change > 1e-3:
        print(
            f"warning: the Q-table still changes by {change:.3g} a sweep after {args.iterations} sweeps. With gamma 1, "
            "a loop in the data that pays a reward on one of its trips makes the values grow without end: try "
            "--gamma 0.9, or more --iterations"
        )
    if args.plot:
        title = f"{args.method}, x = {args.init_q:g}: greedy return {greedy_return:g}, {off_data} steps off the data"
        draw(q, held, policy, path, title, run_dir / "q_table.png")
    summary["wall_time_s"] = round(time.time() - started, 2)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"Run folder {run_dir} (summary.json{', q_table.png' if args.plot else ''})")


if __name__ == "__main__":
    main()
