"""Which finished matrix runs were made by code that still computes the same numbers, and may be kept.

    .venv/bin/python results/check_reuse.py            # check, and write results/matrix/reuse.md
    .venv/bin/python results/check_reuse.py --drop     # also delete the records that must be run again
    .venv/bin/python results/check_reuse.py --records results/matrix_v1 --copy-kept   # an earlier matrix's

A record of results/matrix/ (or of the folder --records names) holds the commit that made it. For each script
and commit among the records made before HEAD, this
  1. compares the flags the run was made with (its summary.json's args) with what the command would give today
     (the script's current defaults under the same command line): a changed default (say, more steps) changes
     the run; a flag added or removed since is left to the short run;
  2. runs the script as it was at that commit and as it is now, with the record's command line and a short
     seeded run (--total-steps 300 --eval-freq 150 --eval-episodes 2) on the same dataset, and compares every
     evaluation (returns, normalised scores, Q estimates; a field added since is not a change) and every
     tensor of the saved model.
  3. compares the dataset file of today with the one the record was trained on: the row of the datasets.md
     committed beside the records (transitions, episodes, mean return, reference returns) against
     data_collection/describe_datasets.py on today's file. A collection made again elsewhere can differ.
Records pass when all three agree exactly; the others are listed, and --drop deletes them so that run_matrix.py
runs them again. With --copy-kept, the records of another folder that pass are copied into results/matrix/.
results/check_short_runs.py makes the same short-run comparison for every script, without matrix records.
"""

import dataclasses
import importlib.util
import json
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "data_collection"))
from dataset_io import parse_flags  # noqa: E402
from run_matrix import MATRIX_DIR, ROOT, fail, read_json_object  # noqa: E402

SHORT = ["--total-steps", "300", "--eval-freq", "150", "--eval-episodes", "2"]
IGNORED_ARGS = {"resume"}  # how a run was continued, not what it computed


@dataclass
class Args:
    drop: bool = False
    """delete the records that fail the check, so that results/run_matrix.py runs them again"""
    records: Path = MATRIX_DIR
    """the folder of finished runs to check, beside the datasets.md committed with them"""
    output: Path = MATRIX_DIR / "reuse.md"
    """the report of the check"""
    copy_kept: bool = False
    """copy the records that pass from --records into results/matrix/ (where no record of that run is yet), so
    that results/run_matrix.py counts them as done"""


def dataset_rows(table: str) -> dict[tuple[str, str], list[str]]:
    """(env, file) -> the cells of a describe_datasets.py table row that describe the data (not its timing)."""
    rows = {}
    for line in table.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("| `"):
            rows[cells[1], cells[0].strip("`")] = cells[:-1]  # the last column is the collection time
    return rows


def changed_datasets(records: list[Path], table: Path) -> set[str]:
    """Dataset paths of the records whose file today is not the one the committed datasets.md describes."""
    committed = subprocess.run(
        ["git", "show", f"HEAD:{table.resolve().relative_to(ROOT)}"], cwd=ROOT, capture_output=True, text=True
    ).stdout
    paths = sorted({made_with(folder)["dataset"] for folder in records})
    existing = [path for path in paths if (ROOT / path).exists()]
    today = (
        subprocess.run(
            [sys.executable, ROOT / "data_collection" / "describe_datasets.py", *existing],
            cwd=ROOT,
            capture_output=True,
            text=True,
        ).stdout
        if existing
        else ""
    )
    before, now = dataset_rows(committed), dataset_rows(today)
    return {
        path
        for path in paths
        if (key := (Path(path).parent.name, Path(path).name)) not in now or before.get(key) != now[key]
    }


def made_with(folder: Path) -> dict:
    """The args of a record's summary.json; a record that cannot be read stops with one line that names it."""
    path = folder / "summary.json"
    args = read_json_object(path).get("args")
    if not (isinstance(args, dict) and isinstance(args.get("dataset"), str)):
        fail(f"{path} has no args with a dataset; restore it (git checkout -- {path}) or delete its folder")
    return args


def current_args(script: str, command: list[str]) -> dict:
    """The args the script would run with today under this command line (its flags over its current defaults)."""
    spec = importlib.util.spec_from_file_location("script", ROOT / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return dataclasses.asdict(tyro.cli(module.Args, args=command[2:]))


def short_run(source: Path, command: list[str], folder: Path) -> tuple[list, dict]:
    """Evaluations and model tensors of a short seeded run of the script file `source`, in `folder`."""
    folder.mkdir(parents=True)
    dataset = command[command.index("--dataset") + 1]
    flags = [*command[2:], *SHORT]
    flags[flags.index("--dataset") + 1] = str(ROOT / dataset)
    result = subprocess.run(
        [sys.executable, str(source), *flags],
        cwd=folder,
        capture_output=True,
        text=True,
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )
    if result.returncode != 0:
        raise RuntimeError((result.stderr.strip().splitlines() or ["no output"])[-1])
    run_dir = next((folder / "runs").iterdir())
    summary = json.loads((run_dir / "summary.json").read_text())
    model = next(path for path in run_dir.glob("*.pt") if path.name != "checkpoint.pt")
    return summary["evaluations"], torch.load(model, weights_only=True)


def same_evaluations(before: list[dict], after: list[dict]) -> bool:
    """Every number the earlier version logged is the same today. A field added since (the per-episode returns)
    is not a changed number; the wall time is the machine's, not the code's."""
    return len(before) == len(after) and all(
        all(key in new and new[key] == value for key, value in old.items() if key != "wall_time_s")
        for old, new in zip(before, after)
    )


def same_numbers(script: str, commit: str, command: list[str]) -> tuple[bool, str]:
    with tempfile.TemporaryDirectory() as temporary:
        old = Path(temporary) / Path(script).name
        old.write_text(
            subprocess.run(
                ["git", "show", f"{commit}:{script}"], cwd=ROOT, capture_output=True, text=True, check=True
            ).stdout
        )
        try:
            before = short_run(old, command, Path(temporary) / "old")
            after = short_run(ROOT / script, command, Path(temporary) / "new")
        except RuntimeError as error:
            return False, f"a short run failed: {error}"
    if not same_evaluations(before[0], after[0]):
        return False, "the evaluations of the short run differ"
    if before[1].keys() != after[1].keys() or not all(torch.equal(before[1][k], after[1][k]) for k in before[1]):
        return False, "the model tensors of the short run differ"
    return True, f"{len(after[0])} evaluations and {len(after[1])} model tensors identical"


def main(args: Args) -> None:
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    groups = defaultdict(list)  # (script, commit, flags beyond --dataset and --seed) -> records
    for path in sorted(args.records.glob("*/run.json")):
        record = read_json_object(path)
        if not (isinstance(record.get("command"), str) and isinstance(record.get("commit"), str)):
            fail(f"{path} lacks its command or commit; restore it (git checkout -- {path}) or delete its folder")
        command = shlex.split(record["command"])
        if record["commit"] == head:
            continue
        flags = [
            flag
            for i, flag in enumerate(command[2:], 2)
            if flag not in ("--dataset", "--seed") and command[i - 1] not in ("--dataset", "--seed")
        ]
        groups[command[1], record["commit"], " ".join(flags)].append((path.parent, command))
    changed_data = changed_datasets(
        [folder for records in groups.values() for folder, _ in records], args.records / "datasets.md"
    )
    command = shlex.join(["python", "results/check_reuse.py", *sys.argv[1:]])
    folder = args.records.resolve().relative_to(ROOT)
    lines = [
        f"Checked at commit {head[:7]} by `{command}`: each finished run of `{folder}/` made "
        "at an earlier commit against the code of today, by its flags and by a short seeded run "
        f"(`{' '.join(SHORT)}`) of both versions on its dataset.",
        "",
        "| script | its flags | commit | runs | flags as today | short run | kept |",
        "|---|---|---|---|---|---|---|",
    ]
    if changed_data:
        lines[1:1] = [
            "",
            "Datasets that differ from those the runs were made on (their runs are not kept): "
            + ", ".join(f"`{path}`" for path in sorted(changed_data))
            + ".",
        ]
    dropped, copied, already = 0, [], []
    for (script, commit, flags), records in sorted(groups.items()):
        changed = set()
        for folder, command in records:
            made = made_with(folder)
            today = current_args(script, command)
            # A flag added since (absent from the record) or removed since (absent today) is left to the short
            # run, which runs the record's command line on both versions.
            changed |= {key for key in set(made) & set(today) - IGNORED_ARGS if made[key] != today[key]}
        flags_text = "same" if not changed else "changed: " + ", ".join(sorted(changed))
        if changed:
            same, how = False, "not run"
        else:
            print(f"{script} {flags} at {commit[:7]}: short runs of both versions ...", flush=True)
            same, how = same_numbers(script, commit, records[0][1])
        kept = [
            (folder, command)
            for folder, command in records
            if same and command[command.index("--dataset") + 1] not in changed_data
        ]
        lines.append(
            f"| `{script}` | `{flags}` | {commit[:7]} | {len(records)} | {flags_text} | {how} | "
            f"{len(kept)} of {len(records)} |"
        )
        print(lines[-1], flush=True)
        if args.copy_kept and args.records.resolve() != MATRIX_DIR.resolve():
            for folder, _ in kept:
                if (MATRIX_DIR / folder.name).exists():
                    already.append(folder.name)
                else:
                    shutil.copytree(folder, MATRIX_DIR / folder.name)
                    copied.append(folder.name)
        if args.drop:
            for folder, _ in (record for record in records if record not in kept):
                subprocess.run(["git", "rm", "-rq", "--ignore-unmatch", str(folder)], cwd=ROOT, check=True)
                subprocess.run(["rm", "-rf", str(folder)], check=True)
                dropped += 1
    if args.copy_kept:
        lines += [
            "",
            f"Copied into `results/matrix/`: {', '.join(f'`{name}`' for name in copied) or 'none'}. "
            f"Kept, but run there already: {', '.join(f'`{name}`' for name in already) or 'none'}.",
        ]
    args.output.write_text("# Finished runs kept from earlier commits\n\n" + "\n".join(lines) + "\n")
    print(
        f"wrote {args.output}"
        + (f"; dropped {dropped} records" if args.drop else "")
        + (f"; copied {len(copied)} records into {MATRIX_DIR}" if args.copy_kept else "")
    )


if __name__ == "__main__":
    main(parse_flags(Args, __doc__))
