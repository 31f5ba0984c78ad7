"""Learning curves and a table of final returns from your own runs/ folder (the algorithm scripts' run folders).

    .venv/bin/python results/plot_runs.py                                 # runs/ -> runs/curves.png
    .venv/bin/python results/plot_runs.py runs/ other_runs/ --output curves.png --metric normalized
    .venv/bin/python results/plot_runs.py runs/ --group-by exp_name learning_rate

Reads every RUN_FOLDER/summary.json under the given folders (a run folder itself may be given too); a folder
without one (a run still going, or killed) or with an unreadable one is skipped with a line that says so.
Runs with the same env, dataset file stem and --group-by arguments (by default exp_name) are the same
experiment over seeds: one panel per (env, dataset), one line per experiment, the mean over seeds at each
evaluation step with a band from the lowest to the highest seed. Seeds may stop at different steps (one
interrupted early): each step then averages the seeds that evaluated it, and the legend gives how many.
Prints a markdown table of each experiment's final return, mean ± population std over seeds (and the
normalized score where the dataset has reference returns), then writes the figure (PNG, or PDF/SVG by suffix).
For the project's own matrix of runs, see results/make_report.py.
"""

import json
import math
import os
import sys
import textwrap
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, NoReturn, Optional

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")  # no display needed: the figure only goes to a file
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import tyro  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "data_collection"))
from dataset_io import parse_flags  # noqa: E402

METRICS = {"return": ("mean_return", "evaluation return"), "normalized": ("normalized_score", "normalized score")}


@dataclass
class Args:
    runs_dirs: Annotated[tuple[Path, ...], tyro.conf.Positional, tyro.conf.arg(metavar="RUNS_DIR")] = (Path("runs"),)
    """folders of run folders (as the algorithm scripts write them into runs/), or run folders themselves"""
    output: Annotated[Optional[Path], tyro.conf.arg(metavar="FILE")] = None
    """where the figure goes (.png, .pdf or .svg); default: curves.png in the first RUNS_DIR"""
    # A str checked by main, not a Literal: tyro's own error for a bad choice is a box of many lines.
    metric: Annotated[str, tyro.conf.arg(metavar="{return,normalized}")] = "return"
    """what the curves show: the mean evaluation return, or the normalized score (0 random, 100 expert)"""
    group_by: Annotated[tuple[str, ...], tyro.conf.arg(metavar="ARG")] = ("exp_name",)
    """script arguments (keys of summary.json's args) that tell lines apart; other differences are averaged"""


@dataclass
class Run:
    folder: Path
    env_id: str
    dataset: str  # the dataset file's stem, as in the run folder's name
    label: str  # the --group-by values: which line of its panel the run belongs to
    seed: object
    interrupted: bool
    evaluations: list[dict]
    args: dict  # the script's arguments, for --group-by


def fail(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def run_folders(folders: tuple[Path, ...]) -> list[Path]:
    """The candidate run folders: each given folder that is a run folder, else its subfolders, once each."""
    found = {}
    for folder in folders:
        if not folder.is_dir():
            what = "it is a file" if folder.exists() else "it does not exist"
            fail(f"{folder} is not a folder ({what}); give the runs/ folder the scripts wrote, or run folders in it")
        is_run = (folder / "summary.json").exists()
        candidates = [folder] if is_run else sorted(path for path in folder.iterdir() if path.is_dir())
        for candidate in candidates:
            found.setdefault(candidate.resolve(), candidate)  # `runs runs/x` must not count runs/x twice
    return list(found.values())


def load_run(folder: Path, group_by: tuple[str, ...]) -> Optional[Run]:
    """The run in `folder`, or None after printing one line that says why it is skipped."""
    path = folder / "summary.json"
    if not path.exists():
        print(f"skipped {folder}: no summary.json (a run still going, or stopped before writing it)")
        return None
    if path.is_dir():
        print(f"skipped {folder}: its summary.json is a folder, not a file")
        return None
    try:
        text = path.read_text()
        summary = json.loads(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        if isinstance(error, json.JSONDecodeError):
            reason = f"it is not JSON: {error}" if text.strip() else "it is empty"
        else:
            reason = "it is not text" if isinstance(error, UnicodeDecodeError) else error.strerror or error
        print(f"skipped {folder}: summary.json is unreadable ({reason})")
        return None
    problem = summary_problem(summary)
    if problem is not None:
        print(f"skipped {folder}: summary.json is not an algorithm script's summary ({problem})")
        return None
    args = summary["args"]
    # One argument: its value alone ("bc"); several: name=value pairs ("exp_name=bc, learning_rate=0.001").
    label = (
        str(args.get(group_by[0])) if len(group_by) == 1 else ", ".join(f"{key}={args.get(key)}" for key in group_by)
    )
    run = Run(
        folder,
        summary["env_id"],
        Path(summary["dataset"]).stem,
        label,
        args.get("seed"),
        summary.get("status") == "interrupted",
        list(summary["evaluations"]),
        dict(args),
    )
    if not run.evaluations:
        print(f"skipped {folder}: summary.json has no evaluation (stopped before the first one)")
        return None
    return run


def summary_problem(summary) -> Optional[str]:
    """What the plot and the table need from a summary.json and it lacks, or None."""
    number = lambda value: isinstance(value, (int, float)) and not isinstance(value, bool)  # noqa: E731
    if not isinstance(summary, dict):
        return f"it holds {json.dumps(summary)[:40]}, not a JSON object"
    kinds = {"args": dict, "env_id": str, "dataset": str, "evaluations": list}
    for key, kind in kinds.items():
        if not isinstance(summary.get(key), kind):
            return f"no {key}" if key not in summary else f"its {key} is {json.dumps(summary[key])[:40]}"
    for evaluation in summary["evaluations"]:
        if not (
            isinstance(evaluation, dict)
            and number(evaluation.get("step"))
            and math.isfinite(evaluation["step"])
            and number(evaluation.get("mean_return"))
        ):
            return f"an evaluation without a step and a mean_return: {json.dumps(evaluation)[:40]}"
        if evaluation.get("normalized_score") is not None and not number(evaluation["normalized_score"]):
            return f"an evaluation's normalized_score is {json.dumps(evaluation['normalized_score'])[:40]}"
    return None


def load_runs(args: Args) -> dict[tuple[str, str, str], list[Run]]:
    """(env, dataset stem, label) -> the runs of that experiment, one per seed."""
    groups = defaultdict(list)
    runs = [run for folder in run_folders(args.runs_dirs) if (run := load_run(folder, args.group_by))]
    if not runs:
        fail(f"no finished or interrupted run (a folder with summary.json) in {', '.join(map(str, args.runs_dirs))}")
    for key in args.group_by:
        # A typo in --group-by would silently put every run on one line labelled "None".
        if all(key not in run.args for run in runs):
            fail(f"--group-by {key}: no run has an argument of that name (see the args in a run's summary.json)")
    for run in runs:
        groups[run.env_id, run.dataset, run.label].append(run)
    for (env_id, dataset, label), members in groups.items():
        seeds = [run.seed for run in members]
        if len(set(map(str, seeds))) < len(seeds):
            print(f"note: {label} on {env_id}, {dataset}: a seed appears more than once ({seeds}); each run counts")
    return dict(sorted(groups.items()))


def curve(runs: list[Run], field: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Steps, then the mean, lowest, highest value and number of seeds at each step any seed evaluated.

    Each step aggregates only the seeds that have it: an interrupted seed must not pull the later steps' mean
    down (or be dropped altogether, as taking only the steps common to all seeds would do to the others)."""
    by_step = defaultdict(list)
    for run in runs:
        for evaluation in run.evaluations:
            if evaluation.get(field) is not None:
                by_step[evaluation["step"]].append(evaluation[field])
    steps = sorted(by_step)
    values = [np.array(by_step[step], dtype=float) for step in steps]
    return (
        np.array(steps),
        np.array([v.mean() for v in values]),
        np.array([v.min() for v in values]),
        np.array([v.max() for v in values]),
        np.array([len(v) for v in values]),
    )


def mean_std(values: list[float]) -> str:
    """Mean ± population std over seeds (as results/make_report.py); one seed has no spread to show."""
    values = [v for v in values if v is not None]
    if len(values) < 2:
        return f"{values[0]:.1f}" if values else "–"
    return f"{np.mean(values):.1f} ± {np.std(values):.1f}"


def table(groups: dict[tuple[str, str, str], list[Run]], group_by: tuple[str, ...]) -> list[str]:
    """Markdown: each experiment's final evaluation (each run's last one), over its seeds."""
    lines = [
        f"| env | dataset | {' / '.join(group_by)} | seeds | last step | final return | normalized score |",
        "|---|---|---|---|---|---|---|",
    ]
    for (env_id, dataset, label), runs in groups.items():
        finals = [run.evaluations[-1] for run in runs]
        last_steps = sorted({final["step"] for final in finals})
        interrupted = sum(run.interrupted for run in runs)
        seeds = f"{len(runs)}" + (f" ({interrupted} interrupted)" if interrupted else "")
        steps = f"{last_steps[0]}" if len(last_steps) == 1 else f"{last_steps[0]} to {last_steps[-1]}"
        lines.append(
            f"| {env_id} | {dataset} | {label} | {seeds} | {steps} | "
            f"{mean_std([final['mean_return'] for final in finals])} | "
            f"{mean_std([final.get('normalized_score') for final in finals])} |"
        )
    return lines


def format_steps(axis) -> None:
    """Gradient steps as 10k, 20k: full numbers collide under a 4-inch panel (short test runs keep theirs)."""
    axis.set_xlabel("gradient steps")
    axis.xaxis.set_major_formatter(
        matplotlib.ticker.FuncFormatter(lambda step, _: f"{step / 1000:g}k" if abs(step) >= 1000 else f"{step:g}")
    )


def plot(groups: dict[tuple[str, str, str], list[Run]], metric: str) -> plt.Figure:
    field, name = METRICS[metric]
    panels = sorted({(env_id, dataset) for env_id, dataset, _ in groups})
    # One colour per line label in every panel, so that an algorithm is the same colour throughout.
    labels = sorted({label for _, _, label in groups})
    colours = {label: f"C{i % 10}" for i, label in enumerate(labels)}
    columns = min(3, len(panels))
    rows = -(-len(panels) // columns)
    # Each panel's legend goes under it, where it hides no curve: the figure grows by the longest legend.
    most_lines = max(sum(key[:2] == panel for key in groups) for panel in panels)
    figure, axes = plt.subplots(rows, columns, figsize=(4.6 * columns, (3.6 + 0.18 * most_lines) * rows), squeeze=False)
    plotted = 0
    for axis, (env_id, dataset) in zip(axes.flat, panels):
        for (_, _, label), runs in ((k, v) for k, v in groups.items() if k[:2] == (env_id, dataset)):
            steps, mean, low, high, counts = curve(runs, field)
            if not len(steps):
                print(f"note: {label} on {env_id}, {dataset} has no {name} (its dataset has no reference returns)")
                continue
            n = len(runs)
            if counts.min() == counts.max() == n:
                legend = f"{label} ({n} seed{'s' if n > 1 else ''})"
            else:
                legend = f"{label} ({counts.min()} to {n} seeds per step)"
                print(
                    f"note: the {n} seeds of {label} on {env_id}, {dataset} evaluated different steps (last: "
                    f"{', '.join(str(run.evaluations[-1]['step']) for run in runs)}); each step averages the "
                    f"{counts.min()} to {n} seeds that evaluated it"
                )
            axis.plot(steps, mean, color=colours[label], label=legend, marker="." if len(steps) < 30 else None)
            axis.fill_between(steps, low, high, color=colours[label], alpha=0.2, linewidth=0)
            plotted += 1
        axis.set_title(wrap(f"{env_id}, {dataset}", 4.2, 10), fontsize=10)
        axis.set_ylabel(name)
        format_steps(axis)
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2), frameon=False)
    for axis in axes.flat[len(panels) :]:
        axis.set_visible(False)
    if not plotted:
        fail(f"no run has a {name}: its datasets have no reference returns; plot --metric return instead")
    title = f"{name}: mean over seeds, band from the lowest to the highest seed"
    figure.suptitle(wrap(title, 4.4 * columns, 11), fontsize=11)
    figure.tight_layout()
    return figure


def wrap(text: str, inches: float, points: float) -> str:
    """Text broken into lines that fit `inches` at a font of `points` (a character is about 0.6 of the font size
    wide): a title wider than its figure or panel would be cut off at both sides."""
    return textwrap.fill(text, max(10, math.floor(inches * 72 / (0.6 * points))))


def save_atomically(figure: plt.Figure, path: Path) -> None:
    """Save under a temporary name, then rename: a crash while saving leaves the previous figure whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        figure.savefig(temporary, dpi=110, format=path.suffix.lstrip(".").lower())  # the format, as the name lacks it
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
        plt.close(figure)


def main(args: Args) -> None:
    if args.metric not in METRICS:
        fail(f"--metric {args.metric}: unknown; choose one of {', '.join(METRICS)}")
    if not args.group_by:
        fail("--group-by needs at least one argument name, such as exp_name")
    output = args.output or args.runs_dirs[0] / "curves.png"
    if output.suffix.lstrip(".").lower() not in ("png", "pdf", "svg"):
        fail(f"--output {output}: give a file name ending in .png, .pdf or .svg")
    groups = load_runs(args)
    print(
        "\nFinal evaluation of each run (its last one; an interrupted run's is earlier), "
        "mean ± population std over seeds:\n"
    )
    print("\n".join(table(groups, args.group_by)) + "\n")
    save_atomically(plot(groups, args.metric), output)
    runs = sum(map(len, groups.values()))
    print(f"wrote {output} ({runs} run{'s' if runs > 1 else ''}, {len(groups)} line{'s' if len(groups) > 1 else ''})")


if __name__ == "__main__":
    main(parse_flags(Args, __doc__))
