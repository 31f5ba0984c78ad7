"""Write a dataset file of this project as a Minari dataset (https://minari.farama.org) in the local Minari folder.

    python data_collection/export_minari.py datasets/Hopper-v5/expert.npz --dataset-id offline-rl/hopper/expert-v0 \
        --author "Your Name"
    python -c "import minari; print(minari.load_dataset('offline-rl/hopper/expert-v0'))"

The transitions are split into episodes after each termination or truncation; an episode's Minari observations are
its observations followed by the final next_observation, so the file's episodes must be contiguous (each
transition's next_observations is the next one's observations), as the collectors write them. A last transition
that ends no episode is exported truncated, which is what the file means by it. The env spec is the one registered
for the metadata's env_id, and the reference returns become ref_min_score (random) and ref_max_score (expert);
Minari stores them only as a pair, so a dataset without an expert reference gets neither.

The Minari folder is MINARI_DATASETS_PATH (default ~/.minari/datasets). The dataset is built in a hidden folder
there and moved into place at the end, so an interrupted export leaves no half dataset behind.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Optional

import gymnasium as gym
import numpy as np
import tyro
from collect_dataset import make_env_checked
from dataset_io import DatasetError, exit_on_dataset_error, load_dataset, parse_flags
from import_minari import check_dataset_id, require_minari

# Minari warns about each metadata field left empty; the export fills what our metadata knows, the rest stays empty.
EMPTY_FIELD_WARNINGS = r"`(code_permalink|author|author_email|algorithm_name|description|eval_env)` is set to None"


@dataclass
class Args:
    dataset: Annotated[Path, tyro.conf.Positional, tyro.conf.arg(metavar="DATASET.npz")]
    """dataset file of this project to export"""
    dataset_id: str
    """Minari id to create, NAMESPACE/NAME-vN (e.g. offline-rl/hopper/expert-v0)"""
    author: Optional[str] = None
    """author recorded in the Minari metadata"""
    author_email: Optional[str] = None
    """author's email (or other contact) recorded in the Minari metadata"""
    code_permalink: Optional[str] = None
    """link to the code that made the data, recorded in the Minari metadata"""
    description: Optional[str] = None
    """description recorded in the Minari metadata; None: one made from the dataset's metadata"""
    overwrite: bool = False
    """replace a local Minari dataset with the same id"""


def split_episodes(arrays: dict[str, np.ndarray], path: Path) -> tuple[np.ndarray, np.ndarray, bool]:
    """First and last transition of each episode, and whether the last one had to be cut (marked truncated)."""
    done = arrays["terminations"] | arrays["truncations"]
    cut = not done[-1]
    ends = np.flatnonzero(np.append(done[:-1], True))
    starts = np.concatenate([[0], ends[:-1] + 1])
    # Minari keeps one observation sequence per episode: inside an episode each next observation must be the
    # following transition's observation, or the data cannot be written as episodes.
    inside = ~done[:-1]
    broken = np.flatnonzero(inside & np.any(arrays["next_observations"][:-1] != arrays["observations"][1:], axis=1))
    if len(broken):
        raise DatasetError(
            f"{path}: next_observations[{broken[0]}] is not observations[{broken[0] + 1}] although no termination or "
            f"truncation lies between them ({len(broken)} places in all); Minari needs contiguous episodes"
        )
    return starts, ends, cut


def episode_buffers(arrays: dict[str, np.ndarray], starts: np.ndarray, ends: np.ndarray, env: gym.Env) -> list:
    """One EpisodeBuffer per episode, built directly (EpisodeBuffer.add_step_data would need jax)."""
    from minari.data_collector import EpisodeBuffer

    buffers = []
    for index, (start, end) in enumerate(zip(starts, ends)):
        steps = slice(start, end + 1)
        observations = np.concatenate([arrays["observations"][steps], arrays["next_observations"][end : end + 1]])
        truncations = arrays["truncations"][steps].copy()
        truncations[-1] |= not arrays["terminations"][end]  # the cut last episode, if any
        buffers.append(
            EpisodeBuffer(
                id=index,
                # Stored in the env's own dtypes (float64 for MuJoCo), as Minari's DataCollector would: lossless.
                observations=observations.astype(env.observation_space.dtype),
                actions=arrays["actions"][steps].astype(env.action_space.dtype),
                rewards=arrays["rewards"][steps],
                terminations=arrays["terminations"][steps],
                truncations=truncations,
            )
        )
    return buffers


def check_fits_env(arrays: dict[str, np.ndarray], env: gym.Env, env_id: str, path: Path) -> None:
    observation_shape, actions = arrays["observations"].shape[1:], arrays["actions"]
    space = env.action_space
    fits = observation_shape == env.observation_space.shape and (
        isinstance(space, gym.spaces.Discrete)
        and actions.ndim == 1
        or isinstance(space, gym.spaces.Box)
        and actions.shape[1:] == space.shape
    )
    if not fits:
        raise DatasetError(
            f"{path} does not fit its env {env_id}: observations {list(observation_shape)}, actions {actions.dtype} "
            f"{list(actions.shape[1:])}; env observations {env.observation_space}, actions {space}"
        )


def create_in_place(minari_folder: Path, dataset_id: str, overwrite: bool, create) -> Path:
    """Run `create` with Minari pointed at a hidden folder inside the Minari folder, then move the dataset (and any
    namespace the Minari folder lacks) into place: renames, so a crash never leaves half a dataset under the id."""
    target = minari_folder / dataset_id
    staging = Path(tempfile.mkdtemp(dir=minari_folder, prefix=f".export-{os.getpid()}-"))
    previous = os.environ.get("MINARI_DATASETS_PATH")
    try:
        os.environ["MINARI_DATASETS_PATH"] = str(staging)
        create()
        for namespace_file in sorted(staging.rglob("namespace_metadata.json")):
            destination = minari_folder / namespace_file.relative_to(staging)
            if not destination.exists():
                destination.parent.mkdir(parents=True, exist_ok=True)
                os.replace(namespace_file, destination)
        target.parent.mkdir(parents=True, exist_ok=True)
        if overwrite and target.exists():
            os.rename(target, staging / "replaced")  # removed with the staging folder below
        try:
            os.rename(staging / dataset_id, target)
        except OSError:  # a non-empty folder took the id meanwhile
            raise DatasetError(
                f"Minari dataset {dataset_id} appeared at {target} while exporting; nothing was written"
            ) from None
    finally:
        if previous is None:
            os.environ.pop("MINARI_DATASETS_PATH", None)
        else:
            os.environ["MINARI_DATASETS_PATH"] = previous
        shutil.rmtree(staging, ignore_errors=True)
    return target


def main() -> None:
    args = parse_flags(Args, __doc__)
    minari = require_minari()
    from minari.storage import get_dataset_path

    check_dataset_id(args.dataset_id)
    target = get_dataset_path(args.dataset_id)
    if target.exists() and not args.overwrite:
        raise DatasetError(
            f"Minari dataset {args.dataset_id} already exists at {target}; pass --overwrite to replace it, "
            f"or choose another id (e.g. a higher -vN)"
        )
    arrays, metadata = load_dataset(args.dataset)
    if len(arrays["rewards"]) == 0:
        raise DatasetError(f"{args.dataset} holds no transitions")
    env_id = metadata["env_id"]
    env = make_env_checked(env_id)
    check_fits_env(arrays, env, env_id, args.dataset)
    starts, ends, cut = split_episodes(arrays, args.dataset)
    buffers = episode_buffers(arrays, starts, ends, env)
    env.close()

    references = metadata.get("reference_returns") or {}
    ref_min, ref_max = references.get("random"), references.get("expert")
    if ref_min is None or ref_max is None:
        print(f"{args.dataset} has no random and expert reference returns: the Minari dataset gets no ref scores")
        ref_min = ref_max = None
    elif ref_min == ref_max:  # Minari's normalised score would divide by zero
        print(
            f"the random and expert reference returns of {args.dataset} are equal ({ref_min}), which scales no score: "
            "the Minari dataset gets no ref scores"
        )
        ref_min = ref_max = None
    episodes = references.get("episodes") if isinstance(references.get("episodes"), int) else 100  # Minari's default
    agent = f" ({metadata['agent']})" if metadata.get("agent") else ""
    description = args.description or (
        f"{metadata['policy']} policy{agent} on {env_id}, exported from {args.dataset.name}; "
        f"made by: {metadata['created_by']}"
    )

    def create() -> None:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=EMPTY_FIELD_WARNINGS)
            minari.create_dataset_from_buffers(
                dataset_id=args.dataset_id,
                buffer=buffers,
                env=gym.spec(env_id),
                algorithm_name=f"{metadata['policy']}{agent}",
                author=args.author,
                author_email=args.author_email,
                code_permalink=args.code_permalink,
                description=description,
                ref_min_score=ref_min,
                ref_max_score=ref_max,
                num_episodes_average_score=episodes,
            )

    folder = create_in_place(get_dataset_path(), args.dataset_id, args.overwrite, create)
    if cut:
        print(f"the last transition of {args.dataset} ends no episode: exported as a truncation")
    print(
        f"wrote Minari dataset {args.dataset_id} to {folder}: {len(arrays['rewards'])} steps in {len(buffers)} "
        f"episodes; load it with minari.load_dataset({args.dataset_id!r})"
    )


if __name__ == "__main__":
    exit_on_dataset_error(main)
