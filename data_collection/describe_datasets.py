"""Print a markdown table describing dataset files: size, episodes, mean return (also as D4RL's normalised score,
100 * (R - R_random) / (R_expert - R_random)), reference returns, collection time.

    python data_collection/describe_datasets.py datasets/*/*.npz
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import tyro
from dataset_io import DatasetError, exit_on_dataset_error, load_dataset, parse_flags


@dataclass
class Args:
    paths: tyro.conf.Positional[list[Path]]
    """dataset files to describe"""


def number(value) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def describe(path: Path) -> str:
    arrays, metadata = load_dataset(path)
    returns = arrays["episode_returns"]
    mean_return = f"{returns.mean():.1f} ± {returns.std():.1f}" if len(returns) else "n/a"
    reference = metadata["reference_returns"]
    random, expert = reference.get("random"), reference.get("expert")
    # Equal references leave the normalised score undefined (a division by zero), as a missing one does.
    scorable = len(returns) and random is not None and expert is not None and expert != random
    score = f"{100 * (returns.mean() - random) / (expert - random):.1f}" if scorable else "n/a"
    seconds = metadata.get("collection_seconds")
    cells = [
        f"`{path.name}`",
        metadata["env_id"],
        metadata["policy"],
        f"`{metadata['agent']}`" if metadata["agent"] else "-",
        f"{metadata['num_transitions']:,}",
        str(len(returns)),
        mean_return,
        score,
        number(random),
        number(expert),
        "-" if seconds is None else f"{seconds:.0f}",
    ]
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    args = parse_flags(Args, __doc__)
    if not args.paths:
        raise DatasetError("give one or more dataset files, e.g. datasets/*/*.npz")
    rows = [describe(path) for path in args.paths]
    print(
        "| file | env | policy | agent | transitions | episodes | mean return | normalised | random ref. "
        "| expert ref. | collection (s) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    exit_on_dataset_error(main)
