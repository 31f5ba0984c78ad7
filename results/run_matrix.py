"""Run the benchmark matrix of results/README.md: every algorithm on every dataset, 3 seeds, resumable.

    .venv/bin/python results/run_matrix.py --list                 # the runs, and which are done
    .venv/bin/python results/run_matrix.py --jobs 2               # run what is not done, 2 at a time
    HF_HUB_OFFLINE=1 HF_HUB_CACHE=<cache> .venv/bin/python results/run_matrix.py --build-datasets   # a fresh clone
    .venv/bin/python results/run_matrix.py --only LunarLander-v3 --stop-within 150
    .venv/bin/python results/run_matrix.py --backend ray --address auto --jobs 32   # on a Ray cluster
    .venv/bin/python results/make_report.py                       # tables and plots from what is done
    .venv/bin/python results/run_matrix.py --grid coverage --jobs 2   # the data-coverage study, its own seeds

--grid coverage runs the study of results/README.md's "Data coverage" section instead: deterministic against
sampled mixes of agents that are not the matrix's, with training seeds that are not the matrix's, recorded in
results/coverage/ the same way (the defaults of the scripts are chosen on it, never on the matrix).

Each run is the algorithm script started from the repository root as a user starts it, with --threads 1 so
that two runs share this 2-core machine without slowing each other. With --backend ray each run is a Ray task
of one CPU that starts the same command on the node Ray places it on; the nodes must see the repository at the
same path (a shared file system), since the records are written there. A finished run leaves, in
results/matrix/<env>__<dataset>__<label>__<seed>/ (committed):
  summary.json  the script's own summary (final returns, evaluations with q_initial, wall time, ...)
  run.json      git commit, command line, the dataset's fingerprint, wall time, start, machine
  scalars.csv   the TensorBoard scalars (losses, diagnostics, SPS), at most --max-points points per tag
and results/matrix/datasets.md describes the datasets (data_collection/describe_datasets.py). The full run
folder (TensorBoard events, model) moves to results/matrix/runs/ and the script's output to
results/matrix/logs/ (both git-ignored). A run counts as done when its run.json exists, so a run killed
half-way (the machine stopping, Ctrl-C) goes on from its last checkpoint next time (the script's --resume), as long
as its script is unchanged since it started; finished runs are skipped. A dataset that is not the file its
finished runs were trained on (by the fingerprint in their run.json) is refused, so that a cell never mixes data.

The datasets must exist (datasets/<env>/<dataset>.npz): --build-datasets builds those that are missing (the
collector gives the same file on another CPU), otherwise the commands that build them are printed. Bad input
(a flag, a missing dataset, uncommitted changes in algorithms/) stops it before any run starts, with exit
status 2.
"""

import csv
import datetime
import hashlib
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from statistics import median
from typing import Literal, NoReturn, Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "data_collection"))
from benchmark_speed import cpu_name  # noqa: E402
from dataset_io import DatasetError, load_dataset, parse_flags  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MATRIX_DIR = ROOT / "results" / "matrix"
DESCRIBE_DATASETS = ROOT / "data_collection" / "describe_datasets.py"

# How each dataset is built (run from the repository root with the sb3 agents reachable, e.g.
# HF_HUB_OFFLINE=1 HF_HUB_CACHE=<a Hub cache holding them>).
COLLECT = "python data_collection/collect_dataset.py"
DATASET_COMMANDS = {
    ("LunarLander-v3", "random"): f"{COLLECT} --env-id LunarLander-v3 --policy random",
    ("LunarLander-v3", "medium"): f"{COLLECT} --env-id LunarLander-v3 --policy expert --algo dqn "
    "--output datasets/LunarLander-v3/medium.npz",
    ("LunarLander-v3", "noisy"): f"{COLLECT} --env-id LunarLander-v3 --policy noisy",
    ("LunarLander-v3", "expert"): f"{COLLECT} --env-id LunarLander-v3 --policy expert",
    ("Hopper-v5", "medium"): f"{COLLECT} --env-id Hopper-v5 --policy expert --algo sac "
    "--output datasets/Hopper-v5/medium.npz",
    ("Hopper-v5", "expert"): f"{COLLECT} --env-id Hopper-v5 --policy expert",
    ("Hopper-v5", "medium-expert"): "python data_collection/mix_datasets.py datasets/Hopper-v5/medium.npz "
    "datasets/Hopper-v5/expert.npz --output datasets/Hopper-v5/medium-expert.npz",
    ("Hopper-v5", "random"): f"{COLLECT} --env-id Hopper-v5 --policy random",
    ("BipedalWalker-v3", "random"): f"{COLLECT} --env-id BipedalWalker-v3 --policy random",
    ("BipedalWalker-v3", "noisy"): f"{COLLECT} --env-id BipedalWalker-v3 --policy noisy",
    ("BipedalWalker-v3", "expert"): f"{COLLECT} --env-id BipedalWalker-v3 --policy expert",
    # Mixes of a weaker and a stronger agent, each sampling from its policy, as D4RL recorded its data.
    ("Hopper-v5", "medium-sampled"): f"{COLLECT} --env-id Hopper-v5 --policy sampled --algo sac "
    "--output datasets/Hopper-v5/medium-sampled.npz",
    ("Hopper-v5", "expert-sampled"): f"{COLLECT} --env-id Hopper-v5 --policy sampled "
    "--output datasets/Hopper-v5/expert-sampled.npz",
    ("Hopper-v5", "medium-expert-sampled"): "python data_collection/mix_datasets.py "
    "datasets/Hopper-v5/medium-sampled.npz datasets/Hopper-v5/expert-sampled.npz "
    "--output datasets/Hopper-v5/medium-expert-sampled.npz",
    ("BipedalWalker-v3", "ppo-sampled"): f"{COLLECT} --env-id BipedalWalker-v3 --policy sampled --algo ppo "
    "--output datasets/BipedalWalker-v3/ppo-sampled.npz",
    ("BipedalWalker-v3", "expert-sampled"): f"{COLLECT} --env-id BipedalWalker-v3 --policy sampled "
    "--output datasets/BipedalWalker-v3/expert-sampled.npz",
    ("BipedalWalker-v3", "ppo-a2c-sampled"): "python data_collection/mix_datasets.py "
    "datasets/BipedalWalker-v3/ppo-sampled.npz datasets/BipedalWalker-v3/expert-sampled.npz "
    "--output datasets/BipedalWalker-v3/ppo-a2c-sampled.npz",
}
# The coverage study's data: sb3/ppo-Hopper-v3 and sb3/tqc-Hopper-v3, each acting deterministically or sampling
# from its policy, with a collection seed that is not the matrix's.
HOPPER_TUNING = f"{COLLECT} --env-id Hopper-v5 --seed 10"
DATASET_COMMANDS |= {
    ("Hopper-v5", "ppo-s10"): f"{HOPPER_TUNING} --policy expert --algo ppo --output datasets/Hopper-v5/ppo-s10.npz",
    ("Hopper-v5", "tqc-s10"): f"{HOPPER_TUNING} --policy expert --algo tqc --output datasets/Hopper-v5/tqc-s10.npz",
    ("Hopper-v5", "ppo-tqc"): "python data_collection/mix_datasets.py datasets/Hopper-v5/ppo-s10.npz "
    "datasets/Hopper-v5/tqc-s10.npz --output datasets/Hopper-v5/ppo-tqc.npz",
    ("Hopper-v5", "ppo-sampled-s10"): f"{HOPPER_TUNING} --policy sampled --algo ppo "
    "--output datasets/Hopper-v5/ppo-sampled-s10.npz",
    ("Hopper-v5", "tqc-sampled-s10"): f"{HOPPER_TUNING} --policy sampled --algo tqc "
    "--output datasets/Hopper-v5/tqc-sampled-s10.npz",
    ("Hopper-v5", "ppo-tqc-sampled"): "python data_collection/mix_datasets.py datasets/Hopper-v5/ppo-sampled-s10.npz "
    "datasets/Hopper-v5/tqc-sampled-s10.npz --output datasets/Hopper-v5/ppo-tqc-sampled.npz",
}
DATASET_INPUTS = {
    ("Hopper-v5", "medium-expert"): (("Hopper-v5", "medium"), ("Hopper-v5", "expert")),
    ("Hopper-v5", "medium-expert-sampled"): (("Hopper-v5", "medium-sampled"), ("Hopper-v5", "expert-sampled")),
    ("BipedalWalker-v3", "ppo-a2c-sampled"): (
        ("BipedalWalker-v3", "ppo-sampled"),
        ("BipedalWalker-v3", "expert-sampled"),
    ),
    ("Hopper-v5", "ppo-tqc"): (("Hopper-v5", "ppo-s10"), ("Hopper-v5", "tqc-s10")),
    ("Hopper-v5", "ppo-tqc-sampled"): (("Hopper-v5", "ppo-sampled-s10"), ("Hopper-v5", "tqc-sampled-s10")),
}
"""the datasets a dataset's command reads"""


@dataclass(frozen=True)
class Algorithm:
    label: str
    """name in the tables and the result folder"""
    script: str
    flags: tuple[str, ...] = ()
    """flags beyond the defaults; a naive learner is its conservative script with the penalty switched off"""
    minutes: float = 5.0
    """expected wall time of one run at 1 thread, used by --stop-within until a run of it has finished"""


CQL_DQN = Algorithm("CQL", "algorithms/cql_discrete_lunarlander.py", minutes=4)
DQN = Algorithm("DQN", "algorithms/cql_discrete_lunarlander.py", ("--cql-alpha", "0", "--exp-name", "dqn"), 3)
BCQ_DISCRETE = Algorithm("BCQ", "algorithms/bcq_discrete.py", minutes=7)
BC = Algorithm("BC", "algorithms/bc.py", minutes=2)
BC_TOP10 = Algorithm("10%BC", "algorithms/bc.py", ("--top-fraction", "0.1", "--exp-name", "bc_top10"), 2)
CQL_SAC = Algorithm("CQL", "algorithms/cql_sac_continuous.py", minutes=36)
SAC = Algorithm("SAC", "algorithms/cql_sac_continuous.py", ("--cql-alpha", "0", "--exp-name", "sac"), 15)
BCQ = Algorithm("BCQ", "algorithms/bcq_continuous.py", minutes=50)
TD3_BC = Algorithm("TD3+BC", "algorithms/td3_bc.py", minutes=20)
IQL = Algorithm("IQL", "algorithms/iql.py", minutes=40)


@dataclass(frozen=True)
class EnvRows:
    env_id: str
    datasets: tuple[str, ...]
    algorithms: tuple[Algorithm, ...]
    extra_flags: tuple[str, ...] = ()
    """flags given to every run of this env (where a default is changed for the whole env, say so in the tables)"""


MATRIX = (
    EnvRows("LunarLander-v3", ("random", "medium", "noisy", "expert"), (CQL_DQN, BCQ_DISCRETE, IQL, DQN, BC)),
    EnvRows(
        "Hopper-v5",
        ("random", "medium", "expert", "medium-expert", "medium-expert-sampled"),
        (CQL_SAC, BCQ, TD3_BC, IQL, SAC, BC, BC_TOP10),
    ),
    EnvRows(
        "BipedalWalker-v3",
        ("random", "noisy", "expert", "ppo-a2c-sampled"),
        (BCQ, CQL_SAC, TD3_BC, IQL, SAC, BC, BC_TOP10),
    ),
)
SEEDS = (1, 2, 3)
COVERAGE = (EnvRows("Hopper-v5", ("ppo-tqc", "ppo-tqc-sampled"), (TD3_BC, BC, BC_TOP10, IQL)),)
GRIDS = {
    "matrix": (MATRIX, SEEDS, MATRIX_DIR),
    "coverage": (COVERAGE, (4, 5, 6), ROOT / "results" / "coverage"),
}
"""each grid: its rows, its training seeds and the folder of its records"""


def select_grid(name: str) -> None:
    """Point MATRIX, SEEDS and MATRIX_DIR, which every function here reads, at the grid `name`."""
    global MATRIX, SEEDS, MATRIX_DIR
    MATRIX, SEEDS, MATRIX_DIR = GRIDS[name]


@dataclass(frozen=True)
class Run:
    env: EnvRows
    dataset: str
    algorithm: Algorithm
    seed: int

    @property
    def key(self) -> str:
        return f"{self.env.env_id}__{self.dataset}__{self.algorithm.label}__{self.seed}"

    @property
    def dataset_path(self) -> str:
        return f"datasets/{self.env.env_id}/{self.dataset}.npz"

    @property
    def command(self) -> list[str]:
        return [
            "python",
            self.algorithm.script,
            "--dataset",
            self.dataset_path,
            "--seed",
            str(self.seed),
            "--threads",
            "1",
            *self.algorithm.flags,
            *self.env.extra_flags,
        ]

    @property
    def record_dir(self) -> Path:
        return MATRIX_DIR / self.key

    @property
    def done(self) -> bool:
        return (self.record_dir / "run.json").exists()


@dataclass
class Args:
    grid: Literal["matrix", "coverage"] = "matrix"
    """matrix: the benchmark of results/README.md; coverage: the data-coverage study (results/coverage/)"""
    jobs: int = 2
    """runs at a time (each at 1 torch thread); 2 on a 2-core machine"""
    only: list[str] = field(default_factory=list)
    """run only the runs whose key (<env>__<dataset>__<label>__<seed>) contains one of these strings"""
    stop_within: Optional[float] = None
    """minutes from now: start no run that is not expected to end by then (a machine that stops kills its runs)"""
    list: bool = False
    """print the runs, done or not, with their commands, and exit"""
    allow_dirty: bool = False
    """run even when algorithms/ has uncommitted changes (the commit recorded would not be the code that ran)"""
    build_datasets: bool = False
    """build the missing datasets of the runs to do first (the Hub agents must be reachable, or cached with
    HF_HUB_OFFLINE=1 HF_HUB_CACHE=<folder>)"""
    max_points: int = 200
    """most points kept per TensorBoard tag in scalars.csv (evenly spaced)"""
    backend: Literal["local", "ray"] = "local"
    """local: a process pool on this machine; ray: each run a Ray task of one CPU, on a Ray cluster"""
    address: Optional[str] = None
    """--backend ray: the cluster to join ("auto": the one `ray start --head` started here, or host:port);
    None: start a Ray instance on this machine for the matrix"""


def all_runs() -> list[Run]:
    """In the order they run: env by env, seed by seed, so that a partial matrix has whole seeds."""
    return [
        Run(env, dataset, algorithm, seed)
        for env in MATRIX
        for seed in SEEDS
        for dataset in env.datasets
        for algorithm in env.algorithms
    ]


def git_state() -> tuple[str, bool]:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "algorithms"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    return commit.strip(), bool(dirty.strip())


def build_datasets(missing: list[tuple[str, str]], jobs: int) -> None:
    """Build each missing dataset with its command of DATASET_COMMANDS, `jobs` at a time: first the datasets
    collected from an env, then those made from others (a mix)."""
    needed, queue = set(), list(missing)
    while queue:
        pair = queue.pop()
        if pair not in needed and not (ROOT / "datasets" / pair[0] / f"{pair[1]}.npz").exists():
            needed.add(pair)
            queue += DATASET_INPUTS.get(pair, ())

    def build(pair: tuple[str, str]) -> None:
        command = shlex.split(DATASET_COMMANDS[pair])
        print(f"[{time.strftime('%H:%M')}] build {'/'.join(pair)}: {shlex.join(command)}", flush=True)
        result = subprocess.run([sys.executable, *command[1:]], cwd=ROOT, capture_output=True, text=True)
        if result.returncode != 0:
            lines = (result.stderr.strip() or result.stdout.strip() or f"exit status {result.returncode}").splitlines()
            fail(f"building {'/'.join(pair)} failed: {lines[-1]}")

    order = list(DATASET_COMMANDS)
    for derived in (False, True):
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            list(
                pool.map(
                    build, sorted((pair for pair in needed if (pair in DATASET_INPUTS) == derived), key=order.index)
                )
            )


def dataset_fingerprint(path: Path) -> str:
    """sha256 of a dataset's arrays and reference returns, the data a run learns and is scored on (its collection
    time and command line left out): two builds with the same fingerprint hold the same data."""
    digest = hashlib.sha256()
    try:
        arrays, metadata = load_dataset(path)
    except DatasetError as error:
        fail(str(error))
    for key in sorted(arrays):
        digest.update(key.encode())
        digest.update(np.ascontiguousarray(arrays[key]).tobytes())
    digest.update(json.dumps(metadata["reference_returns"], sort_keys=True).encode())
    return digest.hexdigest()


def read_json_object(path: Path) -> dict:
    """The JSON object of a record's run.json or summary.json; anything else stops with one line naming the file."""
    remedy = f"restore it (git checkout -- {path}) or delete its folder, and results/run_matrix.py runs it again"
    if path.is_dir():
        fail(f"{path} is a folder, not a file; {remedy}")
    try:
        text = path.read_text()
    except FileNotFoundError:
        fail(f"{path} does not exist; {remedy}")
    except UnicodeDecodeError:
        fail(f"cannot read {path}: it is not text; {remedy}")
    except OSError as error:
        fail(f"cannot read {path}: {error.strerror or error}")
    try:
        value = json.loads(text)
    except ValueError as error:  # json's JSONDecodeError is a ValueError
        fail(f"cannot read {path}: {f'it is not JSON ({error})' if text.strip() else 'it is empty'}; {remedy}")
    if not isinstance(value, dict):
        fail(f"cannot read {path}: it holds {json.dumps(value)[:40]}, not a JSON object; {remedy}")
    return value


def check_datasets(todo: list[Run]) -> dict[str, str]:
    """The fingerprint of each dataset the runs to do use, after checking it against the finished runs on it."""
    fingerprints = {}
    for path in dict.fromkeys(run.dataset_path for run in todo):
        fingerprints[path] = dataset_fingerprint(ROOT / path)
        used = {
            read_json_object(run.record_dir / "run.json").get("dataset_sha256")
            for run in all_runs()
            if run.done and run.dataset_path == path
        } - {None}
        if used - {fingerprints[path]}:
            fail(
                f"{path} is not the file that the finished runs on it were trained on (sha256 "
                f"{fingerprints[path][:12]}, theirs {', '.join(sorted(sha[:12] for sha in used))}): build that file "
                "again, or move their records out of results/matrix/ to run them all on this one"
            )
    return fingerprints


def expected_minutes(run: Run, finished: list[Run]) -> float:
    """Median wall time of finished runs of the same algorithm and env, else the algorithm's estimate."""
    times = [
        read_json_object(other.record_dir / "run.json").get("wall_time_s")
        for other in finished
        if other.env is run.env and other.algorithm is run.algorithm
    ]
    times = [seconds / 60 for seconds in times if isinstance(seconds, (int, float)) and seconds > 0]
    return median(times) if times else run.algorithm.minutes


def export_scalars(run_dir: Path, output: Path, max_points: int) -> None:
    """Write every TensorBoard scalar tag of the run to a CSV (tag, step, value), thinned to max_points per tag."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    with output.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["tag", "step", "value"])
        for tag in sorted(accumulator.Tags()["scalars"]):
            events = accumulator.Scalars(tag)
            stride = max(1, -(-len(events) // max_points))
            kept = events[::stride]
            if kept[-1] is not events[-1]:
                kept.append(events[-1])
            writer.writerows((tag, event.step, f"{event.value:.6g}") for event in kept)


def describe_datasets(runs: list[Run]) -> None:
    """Keep <records>/datasets.md: the table of data_collection/describe_datasets.py for the runs' datasets and the
    datasets their mixes are made of.

    The rows of the datasets present are made again from the files; a dataset that is not here (a checkout that
    built only the datasets of the runs it still had to do) keeps its row of the committed table."""
    wanted = []
    for run in runs:  # a mix follows the datasets it is made of
        pairs = [*DATASET_INPUTS.get((run.env.env_id, run.dataset), ()), (run.env.env_id, run.dataset)]
        wanted += [f"datasets/{env_id}/{dataset}.npz" for env_id, dataset in pairs]
    wanted = list(dict.fromkeys(wanted))
    paths = [path for path in wanted if (ROOT / path).exists()]
    output = MATRIX_DIR / "datasets.md"
    if not paths:
        return
    described = subprocess.run([sys.executable, DESCRIBE_DATASETS, *paths], cwd=ROOT, capture_output=True, text=True)
    if described.returncode != 0:  # a damaged dataset: describe_datasets.py's own line says which and why
        lines = described.stderr.strip().splitlines() or [
            f"{DESCRIBE_DATASETS.name} failed (exit {described.returncode})"
        ]
        fail(lines[-1].removeprefix("error: "))
    table = described.stdout.splitlines()
    header, rows = table[:2], dict(zip(paths, table[2:]))
    for line in output.read_text().splitlines() if output.exists() else []:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        path = f"datasets/{cells[1]}/{cells[0].strip('`')}" if line.startswith("| `") and len(cells) > 1 else None
        if path in wanted and path not in rows:
            rows[path] = line
    kept = [path for path in wanted if path in rows]
    MATRIX_DIR.mkdir(parents=True, exist_ok=True)
    output.write_text(
        f"<!-- made by results/run_matrix.py: python data_collection/describe_datasets.py {' '.join(kept)} -->\n"
        + "\n".join([*header, *(rows[path] for path in kept)])
        + "\n"
    )


def resumable_folder(run: Run, log_path: Path, commit: str) -> Optional[Path]:
    """The run folder of this run's earlier attempt, when it was stopped with a checkpoint and its script has not
    changed since: that run goes on with --resume instead of starting again."""
    text = log_path.read_text() if log_path.is_file() else ""
    started_at, folder = re.match(r"# commit (\w+)\n", text), re.search(r"run folder (\S+)", text)
    if started_at is None or folder is None or not (ROOT / folder.group(1) / "checkpoint.pt").is_file():
        return None
    unchanged = (
        subprocess.run(
            ["git", "diff", "--quiet", started_at.group(1), commit, "--", run.command[1]], cwd=ROOT
        ).returncode
        == 0
    )
    return ROOT / folder.group(1) if unchanged else None


def start(run: Run, commit: str, backend: str) -> tuple["subprocess.Popen | RayRun", float]:
    """Launch the run (resumed from its checkpoint when it can be) as a process here, or as a Ray task."""
    log_path = MATRIX_DIR / "logs" / f"{run.key}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    resume = resumable_folder(run, log_path, commit)
    if resume is None:
        command = [sys.executable, *run.command[1:]]
        log_path.write_text(f"# commit {commit}\n$ {shlex.join(run.command)}\n")
    else:
        command = [sys.executable, run.command[1], "--resume", str(resume.relative_to(ROOT))]
        with log_path.open("a") as log:
            log.write(f"$ {shlex.join(['python', *command[1:]])}\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    if backend == "ray":
        return RayRun(command, log_path, env), time.time()
    with log_path.open("a") as log:
        # A process group of its own, so that Ctrl-C reaches each run once, from main(), not twice (twice stops
        # at once).
        process = subprocess.Popen(
            command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env
        )
    return process, time.time()


def run_in_ray_worker(command: list[str], root: str, log_path: str, env: dict) -> int:
    """The body of a run's Ray task: the same command as a local run, on the node the task was placed on.
    ray.cancel raises KeyboardInterrupt here; the run then gets Ctrl-C, writes its checkpoint and stops."""
    with open(log_path, "a") as log:
        process = subprocess.Popen(
            command, cwd=root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env
        )
        try:
            return process.wait()
        except KeyboardInterrupt:
            process.send_signal(signal.SIGINT)
            return process.wait()


class RayRun:
    """A run submitted as a Ray task of one CPU, with the poll, send_signal and wait of a Popen, so that main()
    schedules both backends alike. The nodes must see this repository (datasets included) at the same path, as
    on a shared file system: the run writes its run folder and log there, and finish() reads them."""

    def __init__(self, command: list[str], log_path: Path, env: dict):
        import ray

        self.ray = ray
        task = ray.remote(num_cpus=1, max_retries=0)(run_in_ray_worker)
        self.reference = task.remote(command, str(ROOT), str(log_path), env)
        self.returncode: Optional[int] = None

    def poll(self) -> Optional[int]:
        if self.returncode is None and self.ray.wait([self.reference], timeout=0)[0]:
            try:
                self.returncode = self.ray.get(self.reference)
            except (
                self.ray.exceptions.TaskCancelledError,
                self.ray.exceptions.RayTaskError,
                self.ray.exceptions.WorkerCrashedError,
            ):
                self.returncode = 130
        return self.returncode

    def send_signal(self, signum: int) -> None:
        self.ray.cancel(self.reference)

    def wait(self) -> int:
        self.ray.wait([self.reference])
        return self.poll()


def finish(run: Run, returncode: int, started: float, commit: str, dataset_sha256: str, max_points: int) -> str:
    wall_time = time.time() - started
    log_path = MATRIX_DIR / "logs" / f"{run.key}.log"
    output = log_path.read_text()
    if returncode == 130:
        return f"interrupted after {wall_time / 60:.1f} min; the next start goes on from its checkpoint"
    if returncode != 0:
        return f"FAILED (exit {returncode}) after {wall_time / 60:.1f} min; see {log_path.relative_to(ROOT)}"
    match = re.search(r"Run folder (\S+)", output)
    if match is None:
        return f"FAILED: no 'Run folder' line in {log_path.relative_to(ROOT)}"
    run_dir = ROOT / match.group(1)
    summary = json.loads((run_dir / "summary.json").read_text())
    wall_time = summary["wall_time_s"]  # all its attempts, when it was resumed
    # Written into a temporary folder and renamed, so that a run.json exists only beside a complete record.
    partial = run.record_dir.with_name(run.record_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    shutil.copy(run_dir / "summary.json", partial / "summary.json")
    export_scalars(run_dir, partial / "scalars.csv", max_points)
    kept_dir = MATRIX_DIR / "runs" / run_dir.name
    kept_dir.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(run_dir), kept_dir)
    record = {
        "key": run.key,
        "env_id": run.env.env_id,
        "dataset": run.dataset,
        "algorithm": run.algorithm.label,
        "seed": run.seed,
        "command": shlex.join(run.command),
        "commit": commit,
        "dataset_sha256": dataset_sha256,
        "started": datetime.datetime.fromtimestamp(started, datetime.timezone.utc).isoformat(timespec="seconds"),
        "wall_time_s": round(wall_time, 1),
        "run_folder": str(kept_dir.relative_to(ROOT)),
        "machine": {
            "cpu": cpu_name(),
            "cores": os.cpu_count(),
            "torch_threads": 1,
            "python": platform.python_version(),
        },
    }
    (partial / "run.json").write_text(json.dumps(record, indent=2) + "\n")
    shutil.rmtree(run.record_dir, ignore_errors=True)
    partial.rename(run.record_dir)
    return f"return {summary['final_mean_return']:.1f} ± {summary['final_std_return']:.1f} in {wall_time / 60:.1f} min"


def fail(message: str) -> NoReturn:
    """Bad input: one line on stderr (and the commands that fix it) and exit status 2, before any run starts."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def connect_to_ray(address: Optional[str]) -> None:
    """Join the Ray cluster at address, or start one on this machine (address None), or stop with one line."""
    try:
        import ray
    except ImportError:
        fail("--backend ray needs Ray: pip install 'ray==2.60.0'")
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
    except (ConnectionError, RuntimeError, ValueError) as error:
        fail(
            f"cannot reach a Ray cluster at {address}: {str(error).strip().splitlines()[0]} "
            f"(start one with `ray start --head`, then give --address auto or its host:port)"
        )
    print(f"Ray: {ray.cluster_resources().get('CPU', 0):.0f} CPUs in the cluster, one per run", flush=True)


def check_flags(args: Args) -> None:
    """Refuse flags that cannot make a matrix run, before anything is read or started."""
    for flag in ("jobs", "max_points"):
        if getattr(args, flag) < 1:
            fail(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if args.stop_within is not None and not args.stop_within > 0:  # inf: no limit, as without the flag
        fail(f"--stop-within takes minutes above 0, got {args.stop_within}")
    if args.address is not None and args.backend != "ray":
        fail("--address names a Ray cluster: give it with --backend ray")


def main(args: Args) -> None:
    check_flags(args)
    deadline = time.time() + 60 * args.stop_within if args.stop_within is not None else None
    if args.grid != "matrix":  # the matrix is what MATRIX, SEEDS and MATRIX_DIR already hold
        select_grid(args.grid)
    runs = [run for run in all_runs() if not args.only or any(part in run.key for part in args.only)]
    describe_datasets(all_runs())
    if args.list:
        if hasattr(signal, "SIGPIPE"):  # not on Windows
            signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `--list | head` ends quietly, as listing tools do
        for run in runs:
            print(f"{'done' if run.done else 'todo'}  {run.key:55s} {shlex.join(run.command)}")
        print(f"{sum(run.done for run in runs)} of {len(runs)} done")
        return
    commit, dirty = git_state()
    if dirty and not args.allow_dirty:
        fail(
            "algorithms/ has uncommitted changes, so run.json's commit would not be the code that ran: "
            "commit them first (or pass --allow-dirty for a trial)."
        )
    missing = sorted(
        {(run.env.env_id, run.dataset) for run in runs if not run.done and not (ROOT / run.dataset_path).exists()}
    )
    if missing and args.build_datasets:
        build_datasets(missing, args.jobs)
        describe_datasets(all_runs())
    elif missing:
        fail(
            "missing datasets; build them with --build-datasets, or from the repository root with:\n"
            + "\n".join(f"  {DATASET_COMMANDS[pair]}" for pair in missing)
        )

    todo = [run for run in runs if not run.done]
    fingerprints = check_datasets(todo)
    print(f"{len(runs) - len(todo)} of {len(runs)} runs done; {len(todo)} to run, {args.jobs} at a time")
    if args.backend == "ray" and todo:
        connect_to_ray(args.address)
    running: dict[Run, tuple["subprocess.Popen | RayRun", float]] = {}
    try:
        while todo or running:
            while todo and len(running) < args.jobs:
                todo = [run for run in todo if not run.done]  # a record may have come in meanwhile (check_reuse)
                finished = [run for run in all_runs() if run.done]
                fitting = [
                    run
                    for run in todo
                    if deadline is None or time.time() + 60 * expected_minutes(run, finished) < deadline
                ]
                if not fitting:
                    break
                run = fitting[0]
                todo.remove(run)
                running[run] = start(run, commit, args.backend)
                print(
                    f"[{time.strftime('%H:%M')}] start {run.key} (about {expected_minutes(run, finished):.0f} min)",
                    flush=True,
                )
            if not running:
                if todo:
                    print(f"{len(todo)} runs left that would not end within --stop-within")
                break
            time.sleep(2)
            for run, (process, started) in list(running.items()):
                if process.poll() is not None:
                    del running[run]
                    outcome = finish(
                        run, process.returncode, started, commit, fingerprints[run.dataset_path], args.max_points
                    )
                    print(f"[{time.strftime('%H:%M')}] done  {run.key}: {outcome}", flush=True)
    except KeyboardInterrupt:
        print("stopping: each run writes its checkpoint, and the next start goes on from there", flush=True)
        for process, _ in running.values():
            process.send_signal(signal.SIGINT)
        for process, _ in running.values():
            process.wait()
        sys.exit(130)


if __name__ == "__main__":
    main(parse_flags(Args, __doc__))
