"""Concatenate datasets of one env into one file, e.g. expert + noisy or D4RL's "medium-expert".

    python data_collection/mix_datasets.py datasets/Hopper-v5/medium.npz datasets/Hopper-v5/expert.npz \
        --output datasets/Hopper-v5/medium-expert.npz

The inputs must share the env id and the observation and action spaces. Episodes stay contiguous (every
input file ends its last, cut episode with a truncation), so `episode_returns` is the inputs' concatenated.
The metadata keeps each input's metadata under `sources`; the reference returns must agree across the
inputs (they do when each was collected with the env's default expert as reference), or name the input
whose reference returns to keep with --reference-from.
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import gymnasium
import numpy as np
import tyro
from dataset_io import (
    ARRAY_KEYS,
    DatasetError,
    default_dataset_path,
    exit_on_dataset_error,
    load_dataset,
    parse_flags,
    prepare_output,
    save_dataset,
)


@dataclass
class Args:
    inputs: tyro.conf.Positional[list[Path]]
    """dataset files to concatenate, in this order"""
    output: Optional[Path] = None
    """where to write the mixed dataset; None: datasets/<env_id>/<policy>+<policy>....npz"""
    overwrite: bool = False
    """replace the output file if it exists"""
    reference_from: Optional[int] = None
    """index (0-based) of the input whose reference_returns to keep when the inputs' differ"""


def spaces_of(arrays: dict[str, np.ndarray], metadata: dict) -> dict:
    """What must agree between mixed datasets; read from the arrays so any dataset file can be checked."""
    actions = arrays["actions"]
    return {
        "observation_shape": list(arrays["observations"].shape[1:]),
        "action_kind": "Discrete" if actions.dtype == np.int64 else "Box",
        "action_shape": list(actions.shape[1:]),
        "action_space": metadata.get("action_space"),
    }


def mix(datasets: list[tuple[dict[str, np.ndarray], dict]], names: list[str], reference_from: Optional[int]):
    """Check that the datasets fit together and return the concatenated arrays and merged metadata."""
    first_arrays, first_metadata = datasets[0]
    for (arrays, metadata), name in zip(datasets[1:], names[1:]):
        if metadata["env_id"] != first_metadata["env_id"]:
            raise DatasetError(
                f"{names[0]} is {first_metadata['env_id']} but {name} is {metadata['env_id']}: mix datasets of one env"
            )
        expected, found = spaces_of(first_arrays, first_metadata), spaces_of(arrays, metadata)
        if expected != found:
            raise DatasetError(f"spaces differ:\n  {names[0]}: {expected}\n  {name}: {found}")
    references = [metadata["reference_returns"] for _, metadata in datasets]
    if reference_from is None:
        if any(reference != references[0] for reference in references[1:]):
            listing = "\n".join(
                f"  [{index}] {name}: {reference}" for index, (name, reference) in enumerate(zip(names, references))
            )
            raise DatasetError(
                f"the inputs' reference returns differ; choose one with --reference-from INDEX:\n{listing}"
            )
        reference_from = 0
    if not 0 <= reference_from < len(datasets):
        raise DatasetError(f"--reference-from must be between 0 and {len(datasets) - 1}")

    arrays = {key: np.concatenate([dataset[key] for dataset, _ in datasets]) for key in ARRAY_KEYS}
    agents = [metadata["agent"] for _, metadata in datasets if metadata["agent"] is not None]
    metadata = {
        "env_id": first_metadata["env_id"],
        "policy": "+".join(metadata["policy"] for _, metadata in datasets),
        "agent": " + ".join(dict.fromkeys(agents)) or None,
        "noise": None,
        "seed": None,
        "num_transitions": int(len(arrays["rewards"])),
        "num_episodes": int(len(arrays["episode_returns"])),
        "observation_space": first_metadata.get("observation_space"),
        "action_space": first_metadata.get("action_space"),
        "reference_returns": references[reference_from],
        "gymnasium_version": gymnasium.__version__,
        "created_by": shlex.join(["python", *sys.argv]),
        "sources": [dict(metadata, path=name) for (_, metadata), name in zip(datasets, names)],
    }
    return arrays, metadata


def check_flags(args: Args) -> None:
    """Refuse flags that cannot make a mix, before any file is read."""
    if len(args.inputs) < 2:
        raise DatasetError("give at least two dataset files to mix")
    if args.reference_from is not None and not 0 <= args.reference_from < len(args.inputs):
        raise DatasetError(
            f"--reference-from must be the index of an input, 0 to {len(args.inputs) - 1}, got {args.reference_from}"
        )


def main() -> None:
    args = parse_flags(Args, __doc__)
    check_flags(args)
    datasets = [load_dataset(path) for path in args.inputs]
    arrays, metadata = mix(datasets, [str(path) for path in args.inputs], args.reference_from)
    output = args.output or default_dataset_path(metadata["env_id"], metadata["policy"])
    prepare_output(output, args.overwrite)
    save_dataset(output, arrays, metadata, args.overwrite)
    returns = arrays["episode_returns"]
    mean_return = f"{returns.mean():.1f}" if len(returns) else "n/a (no complete episode)"
    print(
        f"wrote {output}: {len(arrays['rewards'])} transitions from {len(datasets)} datasets, "
        f"{len(returns)} complete episodes, mean return {mean_return}"
    )


if __name__ == "__main__":
    exit_on_dataset_error(main)
