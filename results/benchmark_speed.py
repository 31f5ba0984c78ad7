"""Speed of our algorithms against d3rlpy 2.8.1's, side by side in one run, and against this CPU's limit.

    .venv/bin/python results/benchmark_speed.py          # writes results/speed.md (21 minutes on 2 cores)
    .venv/bin/python results/benchmark_speed.py --only TD3+BC IQL --output results/speed_td3_bc_iql.md

For each case (an algorithm at its script's defaults, and CQL-SAC also at the paper's sizes) it times our
script, run from the command line as a user runs it (`updates_per_second` of its summary.json, which leaves
out evaluation), and d3rlpy's implementation of the same algorithm with the same network sizes, batch and
sample counts (results/d3rlpy_speed.py), on the same dataset. The two alternate, at each thread count, for
--repeats rounds, and the table shows the medians and their ratio. It also reports:
- each update's FLOPs (results/count_flops.py, torch's FlopCounterMode) against this machine's matmul peak
  (a 2048x2048 fp32 matmul; bf16 on a smaller one), as a share of the limit;
- the collector's transitions per second with one env against a vector env with batched prediction;
- the share of evaluation in the wall time of default training runs whose summary.json is in --default-runs.

d3rlpy pins its own gymnasium, so it lives in a venv of its own, made on first use with
    python3 -m venv .venv-d3rlpy && .venv-d3rlpy/bin/pip install torch==2.13.0 d3rlpy==2.8.1
(torch first and in the same command, or pip fetches CUDA wheels). The datasets are those of the README:
    python data_collection/collect_dataset.py --env-id LunarLander-v3 --policy expert  # and BipedalWalker-v3, Hopper-v5

The collector measurement reads the sb3 agents (sb3/ppo-LunarLander-v2, sb3/tqc-Hopper-v3) offline from the Hub
cache that huggingface_hub uses: $HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub; --hf-cache names
another. Without the agents there, the run says so in one line and the report leaves that section out.
Bad input (flags, a missing dataset) stops it before any measuring, with one line and exit status 2.
"""

import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from statistics import median
from typing import NoReturn, Optional

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "data_collection"))
from dataset_io import parse_flags  # noqa: E402

D3RLPY_REQUIREMENTS = ["torch==2.13.0", "d3rlpy==2.8.1"]


@dataclass
class Args:
    repeats: int = 3
    """timed runs of each implementation per case and thread count; the tables show the median"""
    threads: tuple[int, ...] = (1, 2)
    """torch thread counts to measure at"""
    step_scale: float = 1.0
    """multiplies every case's timed gradient steps (0.05 for a quick check of the script itself)"""
    d3rlpy_venv: Path = ROOT / ".venv-d3rlpy"
    """venv with d3rlpy 2.8.1; created when missing"""
    hf_cache: Optional[Path] = None
    """Hugging Face Hub cache holding the sb3 agents, for the collector measurement (default: huggingface_hub's,
    from HF_HUB_CACHE or HF_HOME)"""
    collector_transitions: int = 20_000
    """transitions per collector run"""
    default_runs: Path = ROOT / "results" / "default_runs"
    """folder of default training runs (each a folder with summary.json) for the evaluation share"""
    output: Path = ROOT / "results" / "speed.md"
    """the report"""
    only: tuple[str, ...] = ()
    """time only the cases whose name starts with one of these (then the collector and evaluation-share
    sections are left out)"""


@dataclass
class Case:
    name: str
    script: str
    flags: list[str]
    dataset: str
    d3rlpy_algo: str
    d3rlpy_settings: dict
    steps: int
    """timed gradient steps per run"""
    target_ratio: float


LUNAR, BIPEDAL, HOPPER = (f"datasets/{env}/expert.npz" for env in ("LunarLander-v3", "BipedalWalker-v3", "Hopper-v5"))
CQL_SAC_D3RLPY = {"batch_size": 256, "cql_alpha": 20.0, "lagrange": False, "target_action_gap": 10.0, "alpha_lr": 3e-4}
CASES = [
    Case(
        "CQL-DQN, defaults (256-256, batch 64)",
        "algorithms/cql_discrete_lunarlander.py",
        [],
        LUNAR,
        "DiscreteCQL",
        {
            "hidden": [256, 256],
            "batch_size": 64,
            "learning_rate": 1e-3,
            "cql_alpha": 1.0,
            "target_update_interval": 1000,
        },
        3000,
        3.0,
    ),
    Case(
        "discrete BCQ, defaults (256-256, batch 64, separate Q and imitation networks)",
        "algorithms/bcq_discrete.py",
        [],
        LUNAR,
        "DiscreteBCQ",
        {
            "hidden": [256, 256],
            "batch_size": 64,
            "learning_rate": 3e-4,
            "threshold": 0.3,
            "target_update_interval": 1000,
            "shared_trunk": False,
        },
        2000,
        3.0,
    ),
    Case(
        "BCQ, defaults = paper (VAE 750-750, actor and critics 400-300, batch 100, 10 samples)",
        "algorithms/bcq_continuous.py",
        [],
        BIPEDAL,
        "BCQ",
        {
            "batch_size": 100,
            "actor_hidden": [400, 300],
            "critic_hidden": [400, 300],
            "vae_hidden": [750, 750],
            "target_samples": 10,
            "lmbda": 0.75,
            "phi": 0.05,
        },
        120,
        1.0,
    ),
    # --bc-steps 0: the timed steps are CQL steps, as d3rlpy's; behaviour-cloning steps are cheaper. d3rlpy
    # estimates the log-sum-exp on every state of the batch, hence --cql-states 256 for matched settings.
    Case(
        "CQL-SAC, defaults' networks (256-256, batch 256, 10 samples of each kind)",
        "algorithms/cql_sac_continuous.py",
        ["--bc-steps", "0", "--cql-states", "256"],
        HOPPER,
        "CQL",
        {**CQL_SAC_D3RLPY, "hidden": [256, 256], "num_random": 10},
        60,
        1.0,
    ),
    Case(
        "CQL-SAC, paper (3x256, batch 256, 10 samples of each kind)",
        "algorithms/cql_sac_continuous.py",
        ["--bc-steps", "0", "--num-layers", "3", "--num-random", "10", "--cql-states", "256"],
        HOPPER,
        "CQL",
        {**CQL_SAC_D3RLPY, "hidden": [256, 256, 256], "num_random": 10},
        50,
        1.0,
    ),
    # alpha only scales a term of the actor's loss: the update's arithmetic is the same at any alpha.
    Case(
        "TD3+BC, defaults (256-256, batch 256, the actor every 2 critic updates)",
        "algorithms/td3_bc.py",
        [],
        HOPPER,
        "TD3PlusBC",
        {
            "hidden": [256, 256],
            "batch_size": 256,
            "alpha": 1.0,
            "policy_noise": 0.2,
            "noise_clip": 0.5,
            "policy_freq": 2,
        },
        1500,
        2.0,
    ),
    Case(
        "IQL, defaults = paper (256-256, batch 256, twin critics, a value network)",
        "algorithms/iql.py",
        [],
        HOPPER,
        "IQL",
        {"hidden": [256, 256], "batch_size": 256, "expectile": 0.7, "beta": 3.0, "max_weight": 100.0},
        1500,
        2.0,
    ),
    Case(
        "BC, defaults on Box actions (256-256, batch 256, squared error)",
        "algorithms/bc.py",
        [],
        HOPPER,
        "BC",
        {"hidden": [256, 256], "batch_size": 256, "learning_rate": 1e-3},
        3000,
        1.0,
    ),
]
FLOP_TARGET = 0.6  # share of the fp32 limit aimed at for the two compute-bound continuous updates
COLLECTOR_ENVS = ("LunarLander-v3", "Hopper-v5")
COLLECTOR_AGENTS = ("ppo-LunarLander-v2", "tqc-Hopper-v3")  # their default experts, in the Hub cache
CACHE_HINT = "(set HF_HUB_CACHE or HF_HOME, or give --hf-cache)"


def run(command: list, cwd: Path, env: Optional[dict] = None) -> str:
    """Run a command; on failure stop with its output."""
    result = subprocess.run([str(part) for part in command], cwd=cwd, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(
            f"error: this command failed (exit {result.returncode}):\n  {shlex.join(map(str, command))}\n"
            f"{result.stdout[-2000:]}{result.stderr[-3000:]}"
        )
    return result.stdout


def ensure_d3rlpy(venv: Path) -> Path:
    python = venv / "bin" / "python"
    if python.exists() and subprocess.run([python, "-c", "import d3rlpy"], capture_output=True).returncode == 0:
        return python
    print(f"creating {venv} with {' '.join(D3RLPY_REQUIREMENTS)} (a few minutes)", flush=True)
    run([sys.executable, "-m", "venv", venv], ROOT)
    run([python, "-m", "pip", "install", "--quiet", *D3RLPY_REQUIREMENTS], ROOT)
    return python


def ours_updates_per_second(case: Case, threads: int, steps: int) -> float:
    with tempfile.TemporaryDirectory() as folder:
        run(
            [
                sys.executable,
                ROOT / case.script,
                "--dataset",
                ROOT / case.dataset,
                "--total-steps",
                steps,
                "--eval-freq",
                steps,
                "--eval-episodes",
                1,
                "--no-save-model",
                "--threads",
                threads,
                *case.flags,
            ],
            Path(folder),
        )
        (summary,) = Path(folder).glob("runs/*/summary.json")
        return json.loads(summary.read_text())["updates_per_second"]


def d3rlpy_command(case: Case, python: Path, threads: int, steps: int) -> list:
    return [
        python,
        ROOT / "results" / "d3rlpy_speed.py",
        "--algo",
        case.d3rlpy_algo,
        "--dataset",
        ROOT / case.dataset,
        "--steps",
        steps,
        "--threads",
        threads,
        "--settings",
        json.dumps(case.d3rlpy_settings),
    ]


def d3rlpy_updates_per_second(case: Case, python: Path, threads: int, steps: int) -> float:
    with tempfile.TemporaryDirectory() as folder:  # d3rlpy may write a d3rlpy_logs folder
        output = run(d3rlpy_command(case, python, threads, steps), Path(folder))
    return json.loads(output.strip().splitlines()[-1])["updates_per_second"]


def flops_per_update(case: Case, d3rlpy_python: Path) -> tuple[float, float]:
    """(ours, d3rlpy's) FLOPs of one update, each counted by results/count_flops.py in its own venv."""
    updates, counter = 10, ROOT / "results" / "count_flops.py"
    uneven = ["--uneven"] if case.d3rlpy_algo == "TD3PlusBC" else []  # the actor moves every other update
    with tempfile.TemporaryDirectory() as folder:
        ours = run(
            [
                sys.executable,
                counter,
                "--updates",
                updates,
                *uneven,
                "--",
                ROOT / case.script,
                "--dataset",
                ROOT / case.dataset,
                "--total-steps",
                updates,
                "--eval-freq",
                updates,
                "--eval-episodes",
                1,
                "--no-save-model",
                *case.flags,
            ],
            Path(folder),
        )
        # d3rlpy_speed.py makes a warm-up fit of min(20, steps) updates before the timed one.
        theirs = run(
            [
                d3rlpy_python,
                counter,
                "--updates",
                2 * updates,
                *uneven,
                "--",
                *d3rlpy_command(case, d3rlpy_python, 1, updates)[1:],
            ],
            Path(folder),
        )
    return (
        json.loads(ours.splitlines()[-1])["flops_per_update"],
        json.loads(theirs.splitlines()[-1])["flops_per_update"],
    )


def matmul_peak(threads: int, dtype: torch.dtype, size: int) -> float:
    """Best GFLOP/s of a size x size matmul over a few tries."""
    torch.set_num_threads(threads)
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b
    best = 0.0
    for _ in range(5):
        start = time.perf_counter()
        a @ b
        best = max(best, 2 * size**3 / (time.perf_counter() - start) / 1e9)
    return best


def collector_transitions_per_second(env_id: str, num_envs: int, transitions: int, hf_cache: Path) -> float:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hf_cache)}
    with tempfile.TemporaryDirectory() as folder:
        output = Path(folder) / "dataset.npz"
        run(
            [
                sys.executable,
                ROOT / "data_collection" / "collect_dataset.py",
                "--env-id",
                env_id,
                "--policy",
                "expert",
                "--num-transitions",
                transitions,
                "--num-envs",
                num_envs,
                "--reference-episodes",
                1,
                "--output",
                output,
            ],
            Path(folder),
            env,
        )
        with np.load(output) as file:
            metadata = json.loads(str(file["metadata"]))
    return metadata["num_transitions"] / metadata["collection_seconds"]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def fail(message: str) -> NoReturn:
    """Bad input: one line on stderr and exit status 2, before any measuring."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def hub_cache(flag: Optional[Path]) -> Path:
    """--hf-cache, else the cache that huggingface_hub reads: HF_HUB_CACHE, else HF_HOME/hub, else
    ~/.cache/huggingface/hub."""
    if flag is not None:
        return flag
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def check_flags(args: Args) -> None:
    """Refuse numbers that cannot make a measurement."""
    if args.repeats < 1 or not args.threads or min(args.threads) < 1:
        fail(f"--repeats and every --threads must be at least 1, got {args.repeats} and {list(args.threads)}")
    if not 0 < args.step_scale < float("inf"):  # NaN fails both comparisons
        fail(f"--step-scale must be a finite number above 0, got {args.step_scale}")
    if args.collector_transitions < 1:
        fail(f"--collector-transitions must be at least 1, got {args.collector_transitions}")


def select_cases(args: Args) -> list[Case]:
    """The cases to time, after checking the flags and the datasets (exit 2 on bad input)."""
    check_flags(args)
    if args.hf_cache is not None and not args.hf_cache.is_dir():
        fail(f"--hf-cache {args.hf_cache} is not a folder")
    cases = [case for case in CASES if not args.only or case.name.startswith(args.only)]
    if not cases:
        fail(f"no case's name starts with any of {list(args.only)}")
    missing = sorted({case.dataset for case in cases if not (ROOT / case.dataset).is_file()})
    if missing:
        fail(
            "missing datasets "
            + ", ".join(missing)
            + ". Build each with\n  "
            + "\n  ".join(
                f"python data_collection/collect_dataset.py --env-id {Path(path).parent.name} --policy expert"
                for path in missing
            )
        )
    return cases


def measure_cases(cases: list[Case], args: Args, d3rlpy_python: Path) -> dict[tuple[str, int, str], list[float]]:
    """Updates per second of every run, keyed by (case name, threads, "ours" or "d3rlpy").

    Ours and d3rlpy's alternate within each round, so that a slow spell of the machine hits both."""
    speeds: dict[tuple[str, int, str], list[float]] = {}
    for round_index in range(args.repeats):
        for threads in args.threads:
            for case in cases:
                steps = max(2, round(case.steps * args.step_scale))
                first, second = ("ours", "d3rlpy") if round_index % 2 == 0 else ("d3rlpy", "ours")
                for implementation in (first, second):
                    value = (
                        ours_updates_per_second(case, threads, steps)
                        if implementation == "ours"
                        else d3rlpy_updates_per_second(case, d3rlpy_python, threads, steps)
                    )
                    speeds.setdefault((case.name, threads, implementation), []).append(value)
                    print(
                        f"round {round_index + 1}/{args.repeats}  {threads} thread(s)  {implementation:6s}  "
                        f"{value:8.1f} updates/s  {case.name}",
                        flush=True,
                    )
    return speeds


def measure_peaks(thread_counts: tuple[int, ...]) -> dict[tuple[int, str], float]:
    """The matmul peak in GFLOP/s, keyed by (threads, "fp32" or "bf16")."""
    peaks = {(threads, "fp32"): matmul_peak(threads, torch.float32, 2048) for threads in thread_counts}
    peaks.update({(threads, "bf16"): matmul_peak(threads, torch.bfloat16, 512) for threads in thread_counts})
    return peaks


def has_collector_agents(cache: Path) -> bool:
    return all((cache / f"models--sb3--{name}").exists() for name in COLLECTOR_AGENTS)


def measure_collector(transitions: int, cache: Path) -> dict[tuple[str, int], float]:
    """Transitions per second, keyed by (env id, --num-envs)."""
    collector = {}
    for env_id in COLLECTOR_ENVS:
        for num_envs in (1, 8):
            collector[(env_id, num_envs)] = collector_transitions_per_second(env_id, num_envs, transitions, cache)
            print(
                f"collector {env_id} num_envs {num_envs}: {collector[(env_id, num_envs)]:.0f} transitions/s", flush=True
            )
    return collector


def read_evaluation_shares(default_runs: Path) -> list[tuple[str, float, float, float, float]]:
    """(run, evaluation seconds, wall seconds, updates/s, final return) of each default run's summary.json."""
    shares = []
    keys = ("eval_time_s", "wall_time_s", "updates_per_second", "final_mean_return")
    for summary_path in sorted(default_runs.glob("*/summary.json")):
        try:
            summary = json.loads(summary_path.read_text())
            values = [summary[key] for key in keys]
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as error:
            what = f"it lacks {error}" if isinstance(error, KeyError) else f"{type(error).__name__}: {error}"
            fail(f"cannot read {summary_path} ({what}); restore it, or move its run folder out of --default-runs")
        if not all(isinstance(value, (int, float)) and not isinstance(value, bool) for value in values):
            fail(f"{summary_path}: {', '.join(keys)} are not all numbers; restore it, or move its run folder out")
        shares.append((summary_path.parent.name, *values))
    return shares


@dataclass
class Measurements:
    started: float
    started_wall: datetime.datetime
    d3rlpy_version: str
    speeds: dict[tuple[str, int, str], list[float]]
    flops: dict[str, tuple[float, float]]
    peaks: dict[tuple[int, str], float]
    collector: dict[tuple[str, int], float]
    """empty when not measured"""
    evaluation_shares: list[tuple[str, float, float, float, float]]
    hf_cache: Path


def header_lines(measured: Measurements) -> list[str]:
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "algorithms", "results"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    command = shlex.join(["python", "results/benchmark_speed.py", *sys.argv[1:]])
    minutes = (time.time() - measured.started) / 60
    return [
        "# Speed: our scripts against d3rlpy, and against this CPU's limit",
        "",
        f"Made by `{command}` on {measured.started_wall:%Y-%m-%d %H:%M} UTC in {minutes:.0f} min, at commit "
        f"`{commit}`{' with uncommitted changes' if dirty else ''}. Machine: {cpu_name()}, {os.cpu_count()} cores, "
        f"{platform.system()} {platform.release()}; Python {platform.python_version()}, torch {torch.__version__} "
        f"(CPU), d3rlpy {measured.d3rlpy_version} with the same torch in its own venv.",
    ]


def speed_lines(cases: list[Case], args: Args, speeds: dict[tuple[str, int, str], list[float]]) -> list[str]:
    lines = [
        "",
        "## Gradient updates per second",
        "",
        f"Median of {args.repeats} runs each, ours and d3rlpy's alternating, on the 200k-transition expert datasets. "
        "Ours: the script from the command line, `updates_per_second` of its summary.json (evaluation left out). "
        "d3rlpy: `fit` with matched sizes (results/d3rlpy_speed.py), after a 20-update warm-up. "
        "The ratio compares the two at the same thread count.",
        "",
        "| case | threads | ours | d3rlpy | ratio | target | met |",
        "|---|---|---|---|---|---|---|",
    ]
    for case in cases:
        for threads in args.threads:
            ours, theirs = median(speeds[(case.name, threads, "ours")]), median(speeds[(case.name, threads, "d3rlpy")])
            lines.append(
                f"| {case.name} | {threads} | {ours:.1f} | {theirs:.1f} | {ours / theirs:.2f}x | "
                f"{case.target_ratio}x | {'yes' if ours / theirs >= case.target_ratio else 'no'} |"
            )
    lines += ["", "Each at its better thread count:", "", "| case | ours | d3rlpy | ratio |", "|---|---|---|---|"]
    for case in cases:
        best_ours = max(median(speeds[(case.name, t, "ours")]) for t in args.threads)
        best_theirs = max(median(speeds[(case.name, t, "d3rlpy")]) for t in args.threads)
        lines.append(f"| {case.name} | {best_ours:.1f} | {best_theirs:.1f} | {best_ours / best_theirs:.2f}x |")
    lines += ["", "All runs, updates/s:", ""]
    for (name, threads, implementation), values in speeds.items():
        runs = ", ".join(f"{value:.1f}" for value in values)
        lines.append(f"- {name}, {threads} thread(s), {implementation}: {runs}")
    return lines


def flops_lines(cases: list[Case], args: Args, measured: Measurements) -> list[str]:
    lines = [
        "",
        "## FLOPs per update against the machine's limit",
        "",
        "FLOPs of one update counted by torch's FlopCounterMode (matrix products) between the ends of the first and "
        "the last of 10 updates (results/count_flops.py). Limit: the best of 5 fp32 2048x2048 matmuls at that "
        "thread count. Equal FLOPs for ours and d3rlpy's say the settings match.",
        "",
        "| case | ours GFLOP/update | d3rlpy GFLOP/update | "
        + " | ".join(f"ours GFLOP/s, {t} thread(s) | share of fp32 limit" for t in args.threads)
        + " |",
        "|---|---|---|" + "---|---|" * len(args.threads),
    ]
    for case in cases:
        ours_flops, their_flops = measured.flops[case.name]
        cells = []
        for threads in args.threads:
            achieved = ours_flops * median(measured.speeds[(case.name, threads, "ours")]) / 1e9
            cells.append(f"{achieved:.1f} | {100 * achieved / measured.peaks[(threads, 'fp32')]:.0f}%")
        lines.append(f"| {case.name} | {ours_flops / 1e9:.3f} | {their_flops / 1e9:.3f} | " + " | ".join(cells) + " |")
    peaks = measured.peaks
    lines += [
        "",
        "| matmul peak | " + " | ".join(f"{t} thread(s)" for t in args.threads) + " |",
        "|---|" + "---|" * len(args.threads),
        "| fp32, 2048x2048, GFLOP/s | " + " | ".join(f"{peaks[(t, 'fp32')]:.0f}" for t in args.threads) + " |",
        "| bf16, 512x512, GFLOP/s | " + " | ".join(f"{peaks[(t, 'bf16')]:.1f}" for t in args.threads) + " |",
        "",
        f"The target is {100 * FLOP_TARGET:.0f}% of the fp32 limit for the two continuous updates.",
    ]
    return lines


def collector_lines(args: Args, measured: Measurements) -> list[str]:
    lines = ["", "## Collector: one env against a vector env", ""]
    if measured.collector:
        lines += [
            "`data_collection/collect_dataset.py --policy expert --num-transitions "
            f"{args.collector_transitions}`, collection time from the dataset's metadata "
            "(reference episodes left out).",
            "",
            "| env | --num-envs 1 | --num-envs 8 | speed-up |",
            "|---|---|---|---|",
        ]
        for env_id in COLLECTOR_ENVS:
            one, eight = measured.collector[(env_id, 1)], measured.collector[(env_id, 8)]
            lines.append(f"| {env_id} | {one:.0f} transitions/s | {eight:.0f} transitions/s | {eight / one:.1f}x |")
    else:
        lines.append(
            "Not measured in a run with --only."
            if args.only
            else f"Not measured: no sb3 agents in {measured.hf_cache} {CACHE_HINT}."
        )
    return lines


def evaluation_lines(args: Args, measured: Measurements) -> list[str]:
    lines = ["", "## Evaluation's share of a default run", ""]
    if measured.evaluation_shares:
        lines += [
            f"From the summary.json of the default runs in `{args.default_runs.relative_to(ROOT)}/`.",
            "",
            "| run | evaluation | wall time | share | updates/s | final return |",
            "|---|---|---|---|---|---|",
        ]
        for name, eval_time, wall_time, updates_per_second, final_return in measured.evaluation_shares:
            lines.append(
                f"| {name} | {eval_time:.0f} s | {wall_time:.0f} s | {100 * eval_time / wall_time:.1f}% | "
                f"{updates_per_second:.1f} | {final_return:.1f} |"
            )
    else:
        lines.append(
            "Not measured in a run with --only."
            if args.only
            else f"Not measured: no run folders with summary.json in {args.default_runs}."
        )
    return lines


def write_report(cases: list[Case], args: Args, measured: Measurements) -> None:
    """The markdown report in --output, written to a temporary file and renamed."""
    lines = (
        header_lines(measured)
        + speed_lines(cases, args, measured.speeds)
        + flops_lines(cases, args, measured)
        + collector_lines(args, measured)
        + evaluation_lines(args, measured)
    )
    temporary = args.output.with_suffix(".md.tmp")
    temporary.write_text("\n".join(lines) + "\n")
    os.replace(temporary, args.output)
    print(f"wrote {args.output}")


def main(args: Args) -> None:
    cases = select_cases(args)
    cache = hub_cache(args.hf_cache)
    measure_the_collector = not args.only and has_collector_agents(cache)
    if not args.only and not measure_the_collector:
        print(f"note: the collector is not measured: no sb3 agents in {cache} {CACHE_HINT}", file=sys.stderr)
    # Read before the measuring, so that a damaged summary.json stops the run at its start, not after 20 minutes.
    evaluation_shares = [] if args.only else read_evaluation_shares(args.default_runs)
    started, started_wall = time.time(), datetime.datetime.now(datetime.timezone.utc)
    d3rlpy_python = ensure_d3rlpy(args.d3rlpy_venv)
    d3rlpy_version = run([d3rlpy_python, "-c", "import d3rlpy; print(d3rlpy.__version__)"], ROOT).strip()
    speeds = measure_cases(cases, args, d3rlpy_python)
    measured = Measurements(
        started,
        started_wall,
        d3rlpy_version,
        speeds,
        flops={case.name: flops_per_update(case, d3rlpy_python) for case in cases},
        peaks=measure_peaks(args.threads),
        collector=measure_collector(args.collector_transitions, cache) if measure_the_collector else {},
        evaluation_shares=evaluation_shares,
        hf_cache=cache,
    )
    write_report(cases, args, measured)


if __name__ == "__main__":
    main(parse_flags(Args, __doc__))
