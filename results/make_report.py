"""Tables and plots of results/README.md from the finished runs of results/run_matrix.py.

    .venv/bin/python results/make_report.py

Reads results/matrix/*/summary.json and run.json (committed, so no dataset or run folder is needed) and
  - rewrites the part of results/README.md between the report markers: score tables (mean ± std over seeds
    of the final evaluation's mean return, and of D4RL's normalised score), the datasets, wall times, commits;
  - draws results/figures/learning_curves_<env>.png: normalised score over gradient steps, mean over seeds
    with a band of one standard deviation, the dataset's own normalised return as a dashed line;
  - draws results/figures/overestimation_<env>.png: the critic's estimate of the return from the evaluation
    episodes' initial states (diagnostics/q_initial) against the discounted return those episodes really got
    (diagnostics/discounted_return_initial), for the naive learner, CQL and BCQ on the same data;
  - reports each env as rliable does (Agarwal et al., 2021, https://arxiv.org/abs/2108.13264): the interquartile
    mean (IQM) of the final normalised scores over the env's datasets and seeds with a 95% stratified-bootstrap
    confidence interval, the probability that each offline method improves on BC, and a performance profile
    (results/figures/performance_profiles.png);
  - draws results/figures/compute.png: normalised score against wall-clock minutes on one core, per algorithm,
    on Hopper medium-expert and BipedalWalker noisy, from the times of each run's own evaluations;
  - checks the claims of the README against the numbers, each marked holds or fails;
  - checks each default step count against its own curves: does the score still climb when the run stops?
The text around the markers (the reading of the numbers) is written by hand.
"""

import json
import re
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import matplotlib
import matplotlib.lines
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "data_collection"))
from dataset_io import parse_flags  # noqa: E402
from run_matrix import GRIDS, MATRIX, MATRIX_DIR, ROOT, SEEDS, fail, read_json_object  # noqa: E402

BEGIN, END = "<!-- report:begin (made by results/make_report.py) -->", "<!-- report:end -->"
COVERAGE_BEGIN, COVERAGE_END = "<!-- coverage:begin (made by results/make_report.py) -->", "<!-- coverage:end -->"
NAIVE = {"DQN", "SAC"}
FILTERED_BC = "10%BC"  # bc.py --top-fraction 0.1: it reads the returns, so it is a bar beside BC, not an offline method
COLOURS = {
    "CQL": "tab:blue",
    "BCQ": "tab:green",
    "TD3+BC": "tab:orange",
    "IQL": "tab:purple",
    "DQN": "tab:red",
    "SAC": "tab:red",
    "BC": "tab:gray",
    "10%BC": "tab:brown",
}


@dataclass
class Args:
    matrix: Path = MATRIX_DIR
    """folder of finished runs (one folder each, with run.json and summary.json) and datasets.md"""
    readme: Path = ROOT / "results" / "README.md"
    """the README whose marked part is rewritten"""
    figures: Path = ROOT / "results" / "figures"
    """folder of the PNG plots"""
    coverage: Path = GRIDS["coverage"][2]
    """folder of the finished runs of the data-coverage study (run_matrix.py --grid coverage)"""


# What the report reads from each record, and the JSON types it may have (None: null).
NUMBER = (int, float)
RECORD_FIELDS = {
    "env_id": (str,),
    "dataset": (str,),
    "algorithm": (str,),
    "command": (str,),
    "commit": (str,),
    "wall_time_s": NUMBER,
    "machine": (dict,),
}
SUMMARY_FIELDS = {
    "final_mean_return": NUMBER,
    "final_normalized_score": (*NUMBER, type(None)),
    "total_steps": NUMBER,
    "updates_per_second": NUMBER,
    "evaluations": (list,),
}
# The coverage section reads fewer: no command, machine, speed or return.
COVERAGE_RECORD_FIELDS = {
    key: RECORD_FIELDS[key] for key in ("env_id", "dataset", "algorithm", "commit", "wall_time_s")
}
COVERAGE_SUMMARY_FIELDS = {key: SUMMARY_FIELDS[key] for key in ("final_normalized_score", "evaluations")}


def check_fields(value: dict, fields: dict, path: Path) -> None:
    """Stop with one line naming the file when a field the report reads is missing or of another kind."""
    remedy = f"restore it (git checkout -- {path}) or delete its folder, and results/run_matrix.py runs it again"
    for key, kinds in fields.items():
        if key not in value:
            fail(f"{path} lacks {key}; {remedy}")
        if not isinstance(value[key], kinds) or isinstance(value[key], bool):
            fail(f"{path}: its {key} is {json.dumps(value[key])[:40]}; {remedy}")
    if "evaluations" in fields and not all(
        isinstance(e, dict) and {"step", "normalized_score"} <= set(e) for e in value["evaluations"]
    ):
        fail(f"{path}: an evaluation is not a JSON object with a step and a normalized_score; {remedy}")


def load_runs(
    matrix: Path, record_fields: dict = RECORD_FIELDS, summary_fields: dict = SUMMARY_FIELDS
) -> dict[tuple[str, str, str], list[dict]]:
    """(env, dataset, algorithm) -> one dict per finished seed, holding its run.json and its summary.json. A record
    that cannot be read, or lacks a field the report reads, stops the report with one line that names its file."""
    runs = defaultdict(list)
    for record_path in sorted(matrix.glob("*/run.json")):
        record = read_json_object(record_path)
        check_fields(record, record_fields, record_path)
        record["summary"] = read_json_object(record_path.parent / "summary.json")
        check_fields(record["summary"], summary_fields, record_path.parent / "summary.json")
        runs[record["env_id"], record["dataset"], record["algorithm"]].append(record)
    return runs


def dataset_scores(matrix: Path) -> dict[tuple[str, str], float]:
    """(env, dataset stem) -> the dataset's normalised mean return, read from results/matrix/datasets.md."""
    path = matrix / "datasets.md"
    if not path.exists():
        return {}
    rows = [line.strip("|").split("|") for line in path.read_text().splitlines() if line.startswith("|")]
    scores = {}
    try:
        header = [cell.strip() for cell in rows[0]]
        for row in rows[2:]:
            cells = dict(zip(header, (cell.strip() for cell in row)))
            if cells["normalised"] != "n/a":
                scores[cells["env"], cells["file"].strip("`").removesuffix(".npz")] = float(cells["normalised"])
    except (IndexError, KeyError, ValueError) as error:
        fail(
            f"cannot read {path}: it is not a table of data_collection/describe_datasets.py ({type(error).__name__}: "
            f"{error}); restore it (git checkout -- {path}), or results/run_matrix.py --list writes it again"
        )
    return scores


def mean_std(values: list[float]) -> str:
    """Mean ± population std (numpy's default, ddof 0) over seeds; one seed has no spread to show."""
    if len(values) < 2:
        return f"{values[0]:.1f}" if values else "–"
    return f"{np.mean(values):.1f} ± {np.std(values):.1f}"


def score_table(runs, env, key: str) -> list[str]:
    labels = [algorithm.label for algorithm in env.algorithms]
    lines = [f"| dataset | {' | '.join(labels)} |", "|---" * (len(labels) + 1) + "|"]
    for dataset in env.datasets:
        values = {
            label: [run["summary"][key] for run in runs.get((env.env_id, dataset, label), [])] for label in labels
        }
        best = max((np.mean(v) for v in values.values() if v), default=None)
        cells = []
        for label in labels:
            text = mean_std(values[label])
            if values[label] and len(values[label]) < len(SEEDS):
                text += f" ({len(values[label])} of {len(SEEDS)} seeds)"
            cells.append(f"**{text}**" if values[label] and np.mean(values[label]) == best else text)
        lines.append(f"| {dataset} | {' | '.join(cells)} |")
    return lines


def cost_table(runs, env) -> list[str]:
    lines = [
        "| algorithm | command (per dataset and seed) | gradient steps | wall time per run (min) | updates/s |",
        "|---|---|---|---|---|",
    ]
    for algorithm in env.algorithms:
        done = [run for dataset in env.datasets for run in runs.get((env.env_id, dataset, algorithm.label), [])]
        if not done:
            continue
        command = re.sub(r"datasets/\S+/\S+\.npz", f"datasets/{env.env_id}/<dataset>.npz", done[0]["command"])
        command = re.sub(r"--seed \d+", "--seed <seed>", command)
        minutes = [run["wall_time_s"] / 60 for run in done]
        speed = [run["summary"]["updates_per_second"] for run in done]
        spread = f" (from {min(minutes):.1f} to {max(minutes):.1f})" if len(minutes) > 1 else " (1 run)"
        lines.append(
            f"| {algorithm.label} | `{command}` | {done[0]['summary']['total_steps']:,} | "
            f"{np.median(minutes):.1f}{spread} | {np.median(speed):.3g} |"
        )
    return lines


def seed_curves(records: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    """Steps and a [seeds, steps] array of an evaluation field, over the steps every seed evaluated."""
    steps = sorted(set.intersection(*({e["step"] for e in r["summary"]["evaluations"]} for r in records)))
    values = [
        [next(e[key] for e in r["summary"]["evaluations"] if e["step"] == step) for step in steps] for r in records
    ]
    return np.array(steps), np.array(values, dtype=float)


def label_steps(axis) -> None:
    """Gradient steps as 10k, 20k: full numbers collide under a 4-inch panel (steps below 1000 keep theirs)."""
    axis.set_xlabel("gradient steps")
    thousands = matplotlib.ticker.FuncFormatter(
        lambda step, _: f"{step / 1000:g}k" if abs(step) >= 1000 else f"{step:g}"
    )
    axis.xaxis.set_major_formatter(thousands)


def mark_empty(axis) -> None:
    """A panel of a dataset that no run has finished on: say so, without the axes' default 0-to-1 ticks."""
    axis.text(0.5, 0.5, "no finished run yet", transform=axis.transAxes, ha="center", va="center", color="gray")
    axis.set_xticks([])
    axis.set_yticks([])


def save_with_legend(figure, axes, path: Path, extra: tuple = ()) -> None:
    """One legend under all the panels, with each label once (a panel may lack an algorithm)."""
    entries = {}
    for axis in axes:
        for handle, label in zip(*axis.get_legend_handles_labels()):
            entries.setdefault(label, handle)
    for handle in extra:
        entries.setdefault(handle.get_label(), handle)
    columns = max(1, min(len(entries), int(figure.get_figwidth() / 1.5)))
    rows = -(-len(entries) // columns)
    figure.legend(entries.values(), entries.keys(), loc="lower center", ncol=columns, fontsize=8)
    figure.tight_layout(rect=(0, 0.07 * rows, 1, 1))
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_learning_curves(runs, env, behaviour: dict, path: Path) -> None:
    figure, axes = plt.subplots(1, len(env.datasets), figsize=(4.2 * len(env.datasets), 3.4), squeeze=False)
    for axis, dataset in zip(axes[0], env.datasets):
        empty = not any(runs.get((env.env_id, dataset, algorithm.label)) for algorithm in env.algorithms)
        if empty:
            mark_empty(axis)
        for algorithm in env.algorithms:
            records = runs.get((env.env_id, dataset, algorithm.label))
            if not records:
                continue
            steps, scores = seed_curves(records, "normalized_score")
            mean, std = scores.mean(axis=0), scores.std(axis=0)
            colour = COLOURS.get(algorithm.label)
            axis.plot(steps, mean, color=colour, label=algorithm.label)
            axis.fill_between(steps, mean - std, mean + std, color=colour, alpha=0.2)
        if (env.env_id, dataset) in behaviour and not empty:
            axis.axhline(behaviour[env.env_id, dataset], color="black", linestyle="--", linewidth=1, label="dataset")
        axis.set_title(f"{env.env_id}, {dataset}")
        label_steps(axis)
        axis.grid(alpha=0.3)
    axes[0][0].set_ylabel("normalised score")
    save_with_legend(figure, axes[0], path)


def plot_overestimation(runs, env, path: Path) -> bool:
    """q_initial (solid) against the real discounted return (dashed) for every algorithm with a critic."""
    labels = [algorithm.label for algorithm in env.algorithms]

    def critic_records(dataset: str, label: str) -> list[dict]:  # BC and 10%BC log no Q(s0)
        records = runs.get((env.env_id, dataset, label)) or []
        return records if records and "q_initial" in records[0]["summary"]["evaluations"][0] else []

    datasets = [d for d in env.datasets if any(critic_records(d, label) for label in labels)]
    if not datasets:
        return False
    figure, axes = plt.subplots(1, len(datasets), figsize=(4.2 * len(datasets), 3.6), squeeze=False)
    for axis, dataset in zip(axes[0], datasets):
        largest = 0.0
        for label in labels:
            records = critic_records(dataset, label)
            if not records:
                continue
            steps, estimate = seed_curves(records, "q_initial")
            _, real = seed_curves(records, "discounted_return_initial")
            colour = COLOURS.get(label)
            axis.plot(steps, estimate.mean(axis=0), color=colour, label=label)
            axis.plot(steps, real.mean(axis=0), color=colour, linestyle="--")
            largest = max(largest, np.abs(estimate).max(), np.abs(real).max())
        if largest > 2000:  # a diverging naive critic: keep the small values readable
            axis.set_yscale("symlog", linthresh=100)
        axis.set_title(f"{env.env_id}, {dataset}")
        label_steps(axis)
        axis.grid(alpha=0.3)
    axes[0][0].set_ylabel("discounted return\nfrom the first states")
    styles = (
        matplotlib.lines.Line2D([], [], color="black", label="Q estimate (q_initial)"),
        matplotlib.lines.Line2D([], [], color="black", linestyle="--", label="real (discounted_return_initial)"),
    )
    save_with_legend(figure, axes[0], path, styles)
    return True


BOOTSTRAP_REPS = 50_000
COMPUTE_PANELS = (("Hopper-v5", "medium-expert"), ("BipedalWalker-v3", "noisy"))
SAMPLED_MIXES = (("Hopper-v5", "medium-expert-sampled"), ("BipedalWalker-v3", "ppo-a2c-sampled"))
"""mixes of a weaker and a stronger agent, each sampling from its policy: where offline RL should beat BC"""


def seed_bootstrap() -> None:
    """rliable's bootstraps resample with numpy's global generator (np.random.choice), whatever random_state they
    are given: seeding it before each estimate makes a report the same every time it is made."""
    np.random.seed(0)


def aggregate_cells(runs, env) -> tuple[list[str], list[str]]:
    """The datasets and algorithms an env's aggregates count while new cells of the matrix are still running: every
    counted algorithm has all its seeds on every counted dataset, so the methods are compared on the same data, and
    of the sets that allow this the one with the most (algorithm, dataset) cells is taken (ties: more algorithms)."""

    def complete(dataset: str, label: str) -> bool:
        cell = runs.get((env.env_id, dataset, label), [])
        return len(cell) == len(SEEDS) and None not in [run["summary"]["final_normalized_score"] for run in cell]

    labels = [algorithm.label for algorithm in env.algorithms]
    best: tuple[tuple[int, int], list[str], list[str]] = ((0, 0), [], [])
    for mask in range(1, 2 ** len(env.datasets)):
        datasets = [dataset for bit, dataset in enumerate(env.datasets) if mask >> bit & 1]
        counted = [label for label in labels if all(complete(dataset, label) for dataset in datasets)]
        size = (len(datasets) * len(counted), len(counted))
        if counted and size > best[0]:
            best = (size, datasets, counted)
    return best[1], best[2]


def final_scores(runs, env, label: str, datasets: list[str]) -> np.ndarray:
    """[seeds, datasets] final normalised scores of one algorithm on the given datasets (every seed has run on
    them: the stratified bootstrap resamples seeds within each dataset)."""
    cells = [[run["summary"]["final_normalized_score"] for run in runs[env.env_id, d, label]] for d in datasets]
    return np.array(cells, dtype=float).T


def interval(point: float, low_high: np.ndarray, digits: int = 1) -> str:
    return f"{point:.{digits}f} [{low_high[0]:.{digits}f}, {low_high[1]:.{digits}f}]"


def rliable_report(runs, figures: Path, readme_dir: Path) -> list[str]:
    """IQM with 95% stratified-bootstrap CIs, probability of improvement over BC, and performance profiles."""
    from rliable import library as rly
    from rliable import metrics

    lines = [
        "### Aggregate scores (rliable)",
        "",
        f"Interquartile mean (IQM) of the final normalised scores over each env's datasets and {len(SEEDS)} "
        f"seeds, with 95% stratified-bootstrap confidence intervals ({BOOTSTRAP_REPS:,} resamples of the seeds "
        "within each dataset); P(X > BC) is the probability that a run of the method on a dataset scores "
        "above a run of BC on it, with its 95% interval. While new cells of the matrix run, each env counts the "
        "datasets and algorithms where every counted algorithm has all its seeds on every counted dataset.",
        "",
        "| env | algorithm | IQM | mean | P(X > BC) |",
        "|---|---|---|---|---|",
    ]
    profiles, counted = [], []
    for env in MATRIX:
        datasets, labels = aggregate_cells(runs, env)
        scores = {label: final_scores(runs, env, label, datasets) for label in labels}
        if not datasets or not scores:
            continue
        left = [dataset for dataset in env.datasets if dataset not in datasets]
        started = {label for (env_id, _, label) in runs if env_id == env.env_id}
        waiting = [a.label for a in env.algorithms if a.label in started and a.label not in labels]
        counted.append(
            f"{env.env_id}: {', '.join(datasets)}"
            + (f" (not yet {', '.join(left)}, where not every algorithm and seed has run)" if left else "")
            + (f", without {' and '.join(waiting)}, not yet run on all of them" if waiting else "")
        )
        aggregate = lambda x: np.array([metrics.aggregate_iqm(x), metrics.aggregate_mean(x)])  # noqa: E731
        seed_bootstrap()
        points, cis = rly.get_interval_estimates(scores, aggregate, reps=BOOTSTRAP_REPS)
        pairs = {label: (matrix, scores["BC"]) for label, matrix in scores.items() if label != "BC" and "BC" in scores}
        seed_bootstrap()
        improvement, improvement_cis = rly.get_interval_estimates(pairs, metrics.probability_of_improvement, reps=2_000)
        for label in scores:
            against_bc = interval(improvement[label], improvement_cis[label][:, 0], 2) if label in pairs else "–"
            lines.append(
                f"| {env.env_id} | {label} | {interval(points[label][0], cis[label][:, 0])} | "
                f"{interval(points[label][1], cis[label][:, 1])} | {against_bc} |"
            )
        profiles.append((env, scores))
    if not profiles:
        return [
            "### Aggregate scores (rliable)",
            "",
            "No env has a dataset where every algorithm has all its seeds yet.",
            "",
        ]
    figure, axes = plt.subplots(1, len(profiles), figsize=(4.2 * len(profiles), 3.4), squeeze=False)
    for axis, (env, scores) in zip(axes[0], profiles):
        taus = np.linspace(min(0.0, min(m.min() for m in scores.values())), max(m.max() for m in scores.values()), 81)
        seed_bootstrap()
        distributions, bands = rly.create_performance_profile(scores, taus, reps=2_000)
        for label, distribution in distributions.items():
            axis.plot(taus, distribution, color=COLOURS.get(label), label=label)
            axis.fill_between(taus, bands[label][0], bands[label][1], color=COLOURS.get(label), alpha=0.15)
        axis.set_title(env.env_id)
        axis.set_xlabel("normalised score τ")
        axis.grid(alpha=0.3)
    axes[0][0].set_ylabel("fraction of runs\nscoring above τ")
    path = figures / "performance_profiles.png"
    save_with_legend(figure, axes[0], path)
    datasets_line = f"Datasets counted: {'; '.join(counted)}."
    return [*lines, "", datasets_line, "", f"![performance profiles]({path.relative_to(readme_dir)})", ""]


def evaluation_minutes(run: dict) -> np.ndarray:
    """Wall-clock minutes from a run's start to each of its evaluations (training and evaluating, one core)."""
    summary = run["summary"]
    return np.array([evaluation["wall_time_s"] / 60 for evaluation in summary["evaluations"]])


def plot_compute(runs, path: Path) -> bool:
    """Normalised score against wall-clock minutes, mean over seeds, on the datasets of COMPUTE_PANELS."""
    panels = [
        (env, dataset)
        for env in MATRIX
        for env_id, dataset in COMPUTE_PANELS
        if env.env_id == env_id and any(runs.get((env_id, dataset, algorithm.label)) for algorithm in env.algorithms)
    ]
    if not panels:
        return False
    figure, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.4), squeeze=False)
    for axis, (env, dataset) in zip(axes[0], panels):
        for algorithm in env.algorithms:
            records = [
                run
                for run in runs.get((env.env_id, dataset, algorithm.label), [])
                if all("wall_time_s" in evaluation for evaluation in run["summary"]["evaluations"])
            ]
            if not records:
                continue
            steps, scores = seed_curves(records, "normalized_score")
            minutes = np.mean(
                [
                    [m for e, m in zip(r["summary"]["evaluations"], evaluation_minutes(r)) if e["step"] in steps]
                    for r in records
                ],
                axis=0,
            )
            axis.plot(
                minutes, scores.mean(axis=0), color=COLOURS.get(algorithm.label), marker=".", label=algorithm.label
            )
        axis.set_title(f"{env.env_id}, {dataset}")
        axis.set_xlabel("wall-clock minutes (one core)")
        axis.grid(alpha=0.3)
    axes[0][0].set_ylabel("normalised score")
    save_with_legend(figure, axes[0], path)
    return True


def claims(runs, behaviour: dict) -> list[str]:
    """The README's claims a teacher relies on, each checked against the runs: holds, fails, or not yet run."""

    def final(env_id, dataset, label) -> Optional[float]:
        records = runs.get((env_id, dataset, label), [])
        return np.mean([r["summary"]["final_normalized_score"] for r in records]) if records else None

    lines = ["### Claims, checked against these runs", "", "| claim | numbers | verdict |", "|---|---|---|"]
    for env in MATRIX:
        naive = [a.label for a in env.algorithms if a.label in NAIVE]
        for label in naive + ["CQL"]:
            for dataset in env.datasets:
                records = runs.get((env.env_id, dataset, label), [])
                if not records:
                    continue
                estimate = np.mean([r["summary"]["evaluations"][-1]["q_initial"] for r in records])
                real = np.mean([r["summary"]["evaluations"][-1]["discounted_return_initial"] for r in records])
                score, bc = final(env.env_id, dataset, label), final(env.env_id, dataset, "BC")
                if label in NAIVE and dataset == "random":
                    # Uniform random actions cover every action in every state, the condition Q-learning needs.
                    if bc is None:
                        continue
                    holds = score > bc
                    text = f"ends at {score:.1f}, BC at {bc:.1f}"
                    claim = f"{label} beats BC on {env.env_id} random, where the data holds every action"
                elif label in NAIVE:
                    data = behaviour.get((env.env_id, dataset))
                    bars = [value for value in (bc, data) if value is not None]
                    holds = estimate > real and all(score < value for value in bars)
                    text = (
                        f"Q(s0) {estimate:.4g} vs real {real:.1f}; ends at {score:.1f}"
                        + (f", BC at {bc:.1f}" if bc is not None else "")
                        + (f", the data at {data:.1f}" if data is not None else "")
                    )
                    claim = f"{label} over-estimates and ends below BC and the data on {env.env_id} {dataset}"
                else:
                    holds = estimate < real
                    text = f"Q(s0) {estimate:.4g} vs real {real:.1f}"
                    claim = f"CQL stays below its real return on {env.env_id} {dataset}"
                seeds = f"{len(records)} seeds'" if len(records) > 1 else "1 seed's"
                lines.append(
                    f"| {claim} | {text} (mean of {seeds} last evaluation) | {'holds' if holds else '**fails**'} |"
                )
    for env_id, dataset in COMPUTE_PANELS + SAMPLED_MIXES:
        env = next((env for env in MATRIX if env.env_id == env_id and dataset in env.datasets), None)
        if env is not None:
            lines.append(beats_bc(runs, env, dataset, len(SEEDS)))
    return [*lines, ""]


def beats_bc(runs, env, dataset: str, seeds: int) -> str:
    """The claims-table line: does the best offline method's 95% bootstrap interval of the mean final normalised
    score lie above BC's on this dataset? Filtered BC (10%BC), which reads the returns, is reported beside it."""
    from rliable import library as rly

    cells = {
        a.label: np.array(
            [[r["summary"]["final_normalized_score"]] for r in runs.get((env.env_id, dataset, a.label), [])],
            dtype=float,
        )
        for a in env.algorithms
        if a.label not in NAIVE
    }
    cells = {label: cell for label, cell in cells.items() if len(cell) == seeds}
    offline = [label for label in cells if label not in ("BC", FILTERED_BC)]
    if "BC" not in cells or not offline:
        return f"| the best offline method beats BC on {env.env_id} {dataset} | not every seed has run | – |"
    seed_bootstrap()
    means, cis = rly.get_interval_estimates(cells, lambda x: np.array([x.mean()]), reps=BOOTSTRAP_REPS)
    best = max(offline, key=lambda label: means[label][0])
    holds = cis[best][0, 0] > cis["BC"][1, 0]
    beside = (
        f"; {FILTERED_BC} {interval(means[FILTERED_BC][0], cis[FILTERED_BC][:, 0])}" if FILTERED_BC in cells else ""
    )
    return (
        f"| the best offline method beats BC outside the 95% intervals on {env.env_id} {dataset} | "
        f"{best} {interval(means[best][0], cis[best][:, 0])} vs BC "
        f"{interval(means['BC'][0], cis['BC'][:, 0])}{beside} | {'holds' if holds else '**fails**'} |"
    )


def still_climbing(records: list[dict]) -> Optional[tuple[float, bool]]:
    """The mean over seeds of (last fifth of the evaluations - the fifth before) of the normalised score, and
    whether it climbs: a gain above 1 point and above twice its standard error over seeds. None below 2 seeds or
    2 evaluations, where there is no spread or no change to measure."""
    _, scores = seed_curves(records, "normalized_score")
    if scores.shape[0] < 2 or scores.shape[1] < 2:
        return None
    fifth = max(1, scores.shape[1] // 5)
    gains = scores[:, -fifth:].mean(axis=1) - scores[:, -2 * fifth : -fifth].mean(axis=1)
    error = gains.std(ddof=1) / np.sqrt(len(gains))
    return gains.mean(), gains.mean() > max(1.0, 2 * error)


def step_table(runs, env) -> list[str]:
    """Datasets by algorithms: the gain of still_climbing, in bold where the score still climbs."""
    labels = [algorithm.label for algorithm in env.algorithms]
    lines = [f"| dataset | {' | '.join(labels)} |", "|---" * (len(labels) + 1) + "|"]
    for dataset in env.datasets:
        cells = []
        for label in labels:
            records = runs.get((env.env_id, dataset, label))
            check = still_climbing(records) if records else None
            if check is None:
                cells.append("–")
            else:
                cells.append(f"**{check[0]:+.1f} climbing**" if check[1] else f"{check[0]:+.1f}")
        lines.append(f"| {dataset} | {' | '.join(cells)} |")
    return lines


def report(runs, matrix: Path, figures: Path, readme_dir: Path) -> list[str]:
    behaviour = dataset_scores(matrix)
    lines = []
    for env in MATRIX:
        if not any(key[0] == env.env_id for key in runs):
            lines += [f"### {env.env_id}", "", "No finished runs yet.", ""]
            continue
        curves = figures / f"learning_curves_{env.env_id}.png"
        plot_learning_curves(runs, env, behaviour, curves)
        lines += [
            f"### {env.env_id}",
            "",
            "Final return (mean ± population std over seeds of each run's final 10-episode mean; best in bold):",
            "",
            *score_table(runs, env, "final_mean_return"),
            "",
            "Normalised score:",
            "",
            *score_table(runs, env, "final_normalized_score"),
            "",
            f"![learning curves]({curves.relative_to(readme_dir)})",
            "",
        ]
        overestimation = figures / f"overestimation_{env.env_id}.png"
        if plot_overestimation(runs, env, overestimation):
            lines += [f"![overestimation]({overestimation.relative_to(readme_dir)})", ""]
        lines += [
            "Does the default step count stop too early? The change of the normalised score (mean over seeds) "
            "from the second-last fifth of the evaluations to the last; **climbing** where the gain is above "
            "1 point and above twice its standard error over seeds:",
            "",
            *step_table(runs, env),
            "",
            "Cost and commands:",
            "",
            *cost_table(runs, env),
            "",
        ]
    lines += rliable_report(runs, figures, readme_dir)
    compute = figures / "compute.png"
    if plot_compute(runs, compute):
        cpus = sorted(
            {
                run["machine"]["cpu"]
                for (env_id, dataset, _), seeds in runs.items()
                if (env_id, dataset) in COMPUTE_PANELS
                for run in seeds
            }
        )
        lines += [
            "### What compute buys",
            "",
            "Normalised score against wall-clock minutes on one core (training "
            "and evaluation, the mean over seeds at each evaluation), on "
            f"{' and '.join(cpus)} (a faster CPU moves a line to the left):",
            "",
            f"![compute]({compute.relative_to(readme_dir)})",
            "",
        ]
    lines += claims(runs, behaviour)
    datasets = matrix / "datasets.md"
    if datasets.exists():
        lines += ["### Datasets", "", *datasets.read_text().splitlines()[1:], ""]
    records = [run for seeds in runs.values() for run in seeds]
    commits = sorted({run["commit"][:7] for run in records})
    machines = sorted({f"{run['machine']['cpu']}, {run['machine']['cores']} cores" for run in records})
    hours = sum(run["wall_time_s"] for run in records) / 3600
    lines += [
        "### Runs",
        "",
        f"{len(records)} runs finished, {hours:.1f} hours of run time in all (2 at a time), "
        f"on {'; '.join(machines)}, at commit{'s' if len(commits) > 1 else ''} {', '.join(commits)}. Each "
        "run's exact command, commit and wall time are in `results/matrix/<run>/run.json`.",
    ]
    return lines


def coverage_report(coverage: Path, figures: Path, readme_dir: Path) -> list[str]:
    """The data-coverage study: each method's final normalised score on a mix collected deterministically and on
    the same mix sampled from the agents' policies (mean and 95% bootstrap interval over seeds), the data's own
    score, what 10%BC kept, the claim that the best offline method beats BC, and results/figures/coverage.png."""
    from rliable import library as rly

    rows, seeds, _ = GRIDS["coverage"]
    runs, behaviour = load_runs(coverage, COVERAGE_RECORD_FIELDS, COVERAGE_SUMMARY_FIELDS), dataset_scores(coverage)
    if not runs:
        return ["No run of the coverage study has finished yet (`results/run_matrix.py --grid coverage`)."]
    lines = []
    figure, axes = plt.subplots(1, len(rows), figsize=(5.5 * len(rows), 3.6), squeeze=False)
    for axis, env in zip(axes[0], rows):
        labels = [algorithm.label for algorithm in env.algorithms]
        lines += [
            f"Final normalised score on {env.env_id}: mean over seeds with its 95% bootstrap interval "
            f"({BOOTSTRAP_REPS:,} resamples; training seeds {', '.join(map(str, seeds))}):",
            "",
            f"| dataset | the data | {' | '.join(labels)} |",
            "|---" * (len(labels) + 2) + "|",
        ]
        claim_lines, kept = [], []
        for position, dataset in enumerate(env.datasets):
            cells = []
            for offset, label in enumerate(labels):
                records = runs.get((env.env_id, dataset, label), [])
                scores = np.array([[r["summary"]["final_normalized_score"]] for r in records], dtype=float)
                if len(records) == 0:
                    cells.append("–")
                    continue
                seed_bootstrap()
                means, cis = rly.get_interval_estimates({label: scores}, lambda x: np.array([x.mean()]), reps=2_000)
                low, high = cis[label][:, 0]
                partial = f" ({len(records)} of {len(seeds)} seeds)" if len(records) < len(seeds) else ""
                cells.append(interval(means[label][0], cis[label][:, 0]) + partial)
                x = position + (offset - (len(labels) - 1) / 2) * 0.12
                axis.errorbar(
                    x,
                    means[label][0],
                    yerr=[[means[label][0] - low], [high - means[label][0]]],
                    fmt="o",
                    color=COLOURS.get(label),
                    label=label,
                    capsize=3,
                )
                if label == FILTERED_BC:
                    summary = records[0]["summary"]
                    kept.append(
                        f"{dataset}: {summary['kept_episodes']} episodes, {summary['kept_transitions']:,} transitions,"
                        f" mean return {summary['kept_mean_return']:.0f}"
                    )
            data = behaviour.get((env.env_id, dataset))
            if data is not None:
                axis.plot([position - 0.3, position + 0.3], [data, data], color="black", linestyle="--", linewidth=1)
            lines.append(f"| {dataset} | {'–' if data is None else f'{data:.1f}'} | {' | '.join(cells)} |")
            claim_lines.append(beats_bc(runs, env, dataset, len(seeds)))
        if kept:
            lines += ["", f"{FILTERED_BC} kept the best 10% of each mix's complete episodes: {'; '.join(kept)}."]
        lines += ["", "| claim | numbers | verdict |", "|---|---|---|", *claim_lines, ""]
        axis.set_xticks(range(len(env.datasets)), env.datasets)
        axis.set_title(env.env_id)
        axis.grid(alpha=0.3, axis="y")
    axes[0][0].set_ylabel("final normalised score")
    path = figures / "coverage.png"
    data_line = matplotlib.lines.Line2D([], [], color="black", linestyle="--", label="the data")
    save_with_legend(figure, axes[0], path, (data_line,))
    records = [run for cell in runs.values() for run in cell]
    commits = sorted({run["commit"][:7] for run in records})
    lines += [
        f"![score against dataset kind]({path.relative_to(readme_dir)})",
        "",
        f"{len(records)} runs, {sum(run['wall_time_s'] for run in records) / 3600:.1f} hours of run time, at "
        f"commit{'s' if len(commits) > 1 else ''} {', '.join(commits)}; each run's command is in "
        "`results/coverage/<run>/run.json`, the datasets in `results/coverage/datasets.md`.",
    ]
    return lines


def replace_between(text: str, begin: str, end: str, lines: list[str], path: Path) -> str:
    """text with the part between the marker lines begin and end replaced by lines; exit 2 without the markers."""
    if begin not in text or end not in text:
        print(
            f"error: {path} has no report markers; put these two lines where the tables go:\n{begin}\n{end}",
            file=sys.stderr,
        )
        sys.exit(2)
    before, rest = text.split(begin, 1)
    return before + "\n".join([begin, *lines, end]) + rest.split(end, 1)[1]


def main(args: Args) -> None:
    runs = load_runs(args.matrix)
    args.figures.mkdir(parents=True, exist_ok=True)
    text = args.readme.read_text() if args.readme.exists() else f"# Results\n\n{BEGIN}\n{END}\n"
    text = replace_between(text, BEGIN, END, report(runs, args.matrix, args.figures, args.readme.parent), args.readme)
    if COVERAGE_BEGIN in text:  # the data-coverage section, where the README has its markers
        coverage = coverage_report(args.coverage, args.figures, args.readme.parent)
        text = replace_between(text, COVERAGE_BEGIN, COVERAGE_END, coverage, args.readme)
    args.readme.write_text(text)
    print(
        f"wrote {args.readme} and {len(list(args.figures.glob('*.png')))} plots in {args.figures}/ "
        f"from {sum(len(v) for v in runs.values())} runs"
    )


if __name__ == "__main__":
    main(parse_flags(Args, __doc__))
