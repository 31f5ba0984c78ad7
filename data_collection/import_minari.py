"""Convert a Minari dataset (https://minari.farama.org) into a dataset file of this project.

    python data_collection/import_minari.py mujoco/hopper/medium-v0 --download
    python data_collection/import_minari.py mujoco/pendulum/expert-v0 --output datasets/Pendulum-v1/minari.npz

Minari stores episodes: an episode of T steps holds T+1 observations (the reset one first, the final one last) and
T actions, rewards, terminations and truncations. Step t becomes the transition (observations[t], actions[t],
rewards[t], observations[t+1], terminations[t], truncations[t]), so at an episode end next_observations is the final
observation. The flags are copied as they are. An episode whose last step is neither terminated nor truncated
(create_dataset_from_buffers allows it) is marked truncated there: it reached no terminal state, so targets still
bootstrap from its final observation, and the next episode's first step is not taken for its continuation. Such
an episode is not complete: it is left out of episode_returns, as the cut episodes of collect_dataset.py are.

The env id is the one in the dataset's env spec (or --env-id). An id that today's gymnasium can no longer make
(LunarLander-v2, MuJoCo -v2/-v3) is replaced by today's (LunarLander-v3, -v5), if the spaces agree; an id that it
still makes is kept, so that evaluation runs on the env that made the data. The reference returns of the normalised
score are the dataset's ref_min_score (random) and ref_max_score (expert) when it has them; otherwise the random one
is measured here with uniform actions, and the expert one with --reference-repo-id, or left empty.

Minari's local datasets live in MINARI_DATASETS_PATH (default ~/.minari/datasets); --download fetches a missing
one from the Farama server, as `minari download ID` does.
"""

from __future__ import annotations

import difflib
import json
import shlex
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Annotated, Any, Optional

import gymnasium as gym
import numpy as np
import tyro
from collect_dataset import agent_source, current_env_id, make_env_checked, measure_reference_returns, same_action_space
from dataset_io import (
    DatasetError,
    check_range,
    default_dataset_path,
    describe_space,
    exit_on_dataset_error,
    parse_flags,
    prepare_output,
    quiet_mujoco_deprecations,
    save_dataset,
)
from tqdm import tqdm

ID_EXAMPLE = "mujoco/hopper/medium-v0"
# What the Minari metadata says about where the data came from; kept in our metadata under "minari".
SOURCE_KEYS = (
    "dataset_id",
    "author",
    "author_email",
    "algorithm_name",
    "code_permalink",
    "description",
    "requirements",
    "minari_version",
    "total_episodes",
    "total_steps",
    "ref_min_score",
    "ref_max_score",
    "num_episodes_average_score",
)


@dataclass
class Args:
    dataset_id: Annotated[str, tyro.conf.Positional, tyro.conf.arg(metavar="DATASET_ID")]
    """Minari dataset id, NAMESPACE/NAME-vN (e.g. mujoco/hopper/medium-v0; `minari list remote` lists them)"""
    output: Optional[Path] = None
    """where to write the dataset; None: datasets/<env_id>/<dataset id with / as ->.npz"""
    download: bool = False
    """download the dataset from the Farama server if it is not in the local Minari folder"""
    env_id: Optional[str] = None
    """gymnasium env id to record for evaluation; None: the dataset's env spec (an old id mapped to today's)"""
    overwrite: bool = False
    """replace the output file if it exists"""
    reference_episodes: int = 20
    """episodes used to measure the reference returns when the dataset has no ref_min_score / ref_max_score"""
    reference_repo_id: Optional[str] = None
    """Hub repo of an sb3 agent that gives the expert reference return when the dataset has no ref_max_score"""
    reference_agent_path: Optional[Path] = None
    """local SB3 zip that gives the expert reference return, instead of --reference-repo-id"""


# ---------------------------------------------------------------------------------------------- minari
def require_minari() -> ModuleType:
    """Import minari, with the install command if it is missing (it is imported here, not at the top, so that
    --help works without it)."""
    try:
        import minari
    except ImportError as error:
        raise DatasetError(
            f'minari is not installed ({error}); install it with: pip install "minari[hdf5]==0.5.4"'
        ) from None
    return minari


def check_dataset_id(dataset_id: str) -> None:
    """Minari's own id pattern, with the version that it needs to find or create a dataset."""
    from minari.dataset.minari_dataset import DATASET_ID_RE

    match = DATASET_ID_RE.fullmatch(dataset_id)
    if match is None or match.group("version") is None:
        raise DatasetError(
            f"malformed Minari dataset id {dataset_id!r}: ids look like NAMESPACE/NAME-vN, e.g. {ID_EXAMPLE}"
        )


def open_minari_dataset(minari: ModuleType, dataset_id: str, download: bool):
    """minari.load_dataset with one clear line for each way it fails."""
    from minari.storage import get_dataset_path

    check_dataset_id(dataset_id)
    folder = get_dataset_path(dataset_id)
    if not (folder / "data").exists() and not download:
        # Offline there is no telling an id the server lacks from one not downloaded yet: name both ways out.
        close = difflib.get_close_matches(dataset_id, list(minari.list_local_datasets()), n=3)
        hint = f" Local datasets with a similar id: {', '.join(close)}." if close else ""
        raise DatasetError(
            f"Minari dataset {dataset_id} is not in the local Minari folder {get_dataset_path()} "
            f"(MINARI_DATASETS_PATH); get it with `minari download {dataset_id}` or pass --download.{hint}"
        )
    try:
        dataset = minari.load_dataset(dataset_id, download=download)
    except ValueError as error:
        if "Couldn't find any version" in str(error):
            raise DatasetError(
                f"unknown Minari dataset id {dataset_id}: the Farama server has no version of it; "
                f"`minari list remote` lists the datasets there"
            ) from None
        raise DatasetError(f"cannot load Minari dataset {dataset_id}: {error}") from None
    except ImportError as error:  # a storage format (h5py, pyarrow) or the remote's client is not installed
        raise DatasetError(f"cannot load Minari dataset {dataset_id}: {error}") from None
    except Exception as error:  # a download fails with requests', huggingface_hub's and OS errors of many kinds
        action = "downloading" if download and not (folder / "data").exists() else "reading"
        raise DatasetError(f"{action} Minari dataset {dataset_id} failed: {type(error).__name__}: {error}") from None
    # The data file opens lazily: read an episode now, so that a damaged one stops the import here, not after the
    # reference returns have been measured.
    try:
        if dataset.total_episodes:
            next(iter(dataset.iterate_episodes([0])))
    except (OSError, KeyError) as error:  # h5py's errors for a truncated or foreign data file are OSErrors
        raise damaged(dataset_id, error) from None
    return dataset


def damaged(dataset_id: str, error: Exception) -> DatasetError:
    """A Minari dataset whose files cannot be read, in one line (h5py's messages span several)."""
    from minari.storage import get_dataset_path

    text = " ".join(str(error).split())
    text = text if len(text) <= 200 else text[:197] + "..."
    return DatasetError(
        f"Minari dataset {dataset_id} is damaged ({type(error).__name__}: {text}); delete "
        f"{get_dataset_path(dataset_id)} and download it again (minari download {dataset_id})"
    )


def jsonable(value: Any) -> Any:
    """Minari metadata holds sets (authors) and numpy scalars; our metadata is strict JSON."""
    return json.loads(
        json.dumps(
            value,
            default=lambda item: (
                item.item() if isinstance(item, np.generic) else sorted(item) if isinstance(item, set) else str(item)
            ),
        )
    )


# ---------------------------------------------------------------------------------------------- spaces and env
def check_flat_spaces(observation_space: gym.Space, action_space: gym.Space, dataset_id: str) -> None:
    """Our format holds flat observation vectors and Discrete or 1-D Box actions, nothing nested."""
    if not (isinstance(observation_space, gym.spaces.Box) and len(observation_space.shape) == 1):
        raise DatasetError(
            f"Minari dataset {dataset_id} has observations {observation_space}; the datasets of this project hold flat "
            f"vectors (a 1-D Box), so Dict, Tuple, image and Discrete observations cannot be converted"
        )
    flat_box = isinstance(action_space, gym.spaces.Box) and len(action_space.shape) == 1
    if not (isinstance(action_space, gym.spaces.Discrete) or flat_box):
        raise DatasetError(
            f"Minari dataset {dataset_id} has actions {action_space}; only Discrete and 1-D Box actions are supported"
        )


def make_today(env_id: str) -> Optional[gym.Env]:
    """The env, or None when gymnasium cannot make this id today."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # "out of date" ids: the caller says what it does about it
        try:
            quiet_mujoco_deprecations(env_id)
            return gym.make(env_id)
        except (gym.error.Error, ImportError):  # MuJoCo -v2/-v3 raise a plain ImportError (they need mujoco-py)
            return None


def resolve_env(dataset, requested: Optional[str]) -> tuple[str, gym.Env]:
    """Today's env id for the dataset, and the env, whose spaces must be the dataset's."""
    original = dataset.env_spec.id if dataset.env_spec is not None else None
    if requested is None and original is None:
        raise DatasetError(
            f"Minari dataset {dataset.id} records no env spec; name the env to evaluate on with --env-id"
        )
    if requested is not None:
        env_id, env = requested, make_env_checked(requested)
    else:
        env_id, env = original, make_today(original)
        if env is None:  # removed, deprecated, or needs mujoco-py: today's id, if there is one
            env_id = current_env_id(original)
            try:
                env = make_env_checked(env_id)
            except DatasetError as error:
                requirements = dataset.storage.metadata.get("requirements") or []
                needs = f"; the dataset lists the requirements {', '.join(requirements)}" if requirements else ""
                raise DatasetError(
                    f"{error} (the env of Minari dataset {dataset.id}{needs}); or name another env with --env-id"
                ) from None
        elif current_env_id(original) != original:
            print(
                f"{original} still exists in gymnasium {gym.__version__}, so the dataset keeps it; pass "
                f"--env-id {current_env_id(original)} to evaluate on today's version instead"
            )
    data_observation, data_action = describe_space(dataset.observation_space), describe_space(dataset.action_space)
    env_observation, env_action = describe_space(env.observation_space), describe_space(env.action_space)
    if data_observation.get("shape") != env_observation.get("shape") or not same_action_space(data_action, env_action):
        which = f"{env_id} (today's id for {original})" if env_id != original and requested is None else env_id
        raise DatasetError(
            f"the spaces of Minari dataset {dataset.id} do not fit {which}: dataset observations "
            f"{dataset.observation_space}, actions {dataset.action_space}; env observations {env.observation_space}, "
            f"actions {env.action_space}"
        )
    if env_id != original and requested is None:
        print(
            f"{dataset.id} was collected on {original}, which gymnasium {gym.__version__} replaces by {env_id}: "
            f"recording {env_id} (the spaces agree)"
        )
    if dataset.env_spec is not None:
        # Our format records only the env id: evaluation makes it with the registered arguments and time limit.
        recorded = {key: value for key, value in dataset.env_spec.kwargs.items() if key != "render_mode"}
        registered = gym.spec(env_id)
        if recorded != registered.kwargs or dataset.env_spec.max_episode_steps != registered.max_episode_steps:
            print(
                f"warning: {dataset.id} was collected with {original}(**{recorded}, max_episode_steps="
                f"{dataset.env_spec.max_episode_steps}); evaluation will use gym.make({env_id!r}) "
                f"(max_episode_steps={registered.max_episode_steps})"
            )
    return env_id, env


def reference_returns(dataset, env_id: str, action_space: gym.Space, args: Args) -> dict[str, Any]:
    """The dataset's own reference scores, else measured as collect_dataset.py does."""
    metadata = dataset.storage.metadata
    ref_min, ref_max = metadata.get("ref_min_score"), metadata.get("ref_max_score")
    if ref_min is not None and ref_max is not None:
        return {
            "random": float(ref_min),
            "expert": float(ref_max),
            "expert_agent": f"{dataset.id} (ref_max_score)",
            "episodes": metadata.get("num_episodes_average_score"),
            "source": "ref_min_score and ref_max_score of the Minari dataset",
            "measured_on": dataset.env_spec.id if dataset.env_spec is not None else None,
        }
    box = isinstance(action_space, gym.spaces.Box)
    if box and not np.all(np.isfinite(action_space.low) & np.isfinite(action_space.high)):
        print(
            f"{dataset.id} has no reference scores and {env_id} has unbounded actions, so no uniform random policy: "
            f"the reference returns are left empty (no normalised score)"
        )
        return {"random": None, "expert": None, "expert_agent": None, "episodes": 0, "seeds": None}
    source = None
    if args.reference_repo_id is not None or args.reference_agent_path is not None:
        source = agent_source(env_id, args.reference_repo_id, None, args.reference_agent_path)
        import torch

        torch.set_num_threads(1)  # batched prediction of a small MLP: more threads only contend for the cores
    print(f"{dataset.id} has no ref_min_score / ref_max_score: measuring the reference returns on {env_id}")
    return measure_reference_returns(env_id, action_space, source, {}, args.reference_episodes)


# ---------------------------------------------------------------------------------------------- episodes
def read_episodes(dataset):
    """The dataset's episodes; a data file damaged past its first episode stops in one line."""
    iterator = iter(dataset.iterate_episodes())
    while True:
        try:
            episode = next(iterator)
        except StopIteration:
            return
        except (OSError, KeyError) as error:
            raise damaged(dataset.id, error) from None
        yield episode


def episodes_to_transitions(dataset, discrete: bool) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Lay the episodes end to end as transitions; returns the arrays and counts of what needed care."""
    total, observation_dim = dataset.total_steps, dataset.observation_space.shape[0]
    action_shape = () if discrete else dataset.action_space.shape
    observations = np.empty((total, observation_dim), np.float32)  # filled in place: a 1M-step dataset fits once
    next_observations = np.empty((total, observation_dim), np.float32)
    actions = np.empty((total, *action_shape), np.int64 if discrete else np.float32)
    rewards = np.empty(total, np.float32)
    terminations, truncations = np.zeros(total, bool), np.zeros(total, bool)
    episode_end = np.zeros(total, bool)
    stop = 0
    episodes = tqdm(
        read_episodes(dataset),
        total=dataset.total_episodes,
        desc=f"reading {dataset.id}",
        unit="episodes",
        mininterval=1.0,
    )
    for episode in episodes:
        length = len(episode.rewards)
        episode_observations = np.asarray(episode.observations)
        if len(episode_observations) != length + 1 or len(episode.actions) != length:
            raise DatasetError(
                f"episode {episode.id} of {dataset.id} has {len(episode_observations)} observations, "
                f"{len(episode.actions)} actions and {length} rewards; a Minari episode has one more observation "
                f"than steps"
            )
        if length == 0:
            continue
        start, stop = stop, stop + length
        if stop > total:
            raise DatasetError(f"{dataset.id} holds more steps than the {total} its metadata states")
        observations[start:stop] = episode_observations[:-1]
        next_observations[start:stop] = episode_observations[1:]
        actions[start:stop] = np.asarray(episode.actions).reshape(length, *action_shape)
        rewards[start:stop] = episode.rewards
        terminations[start:stop] = episode.terminations
        truncations[start:stop] = episode.truncations
        episode_end[stop - 1] = True
    if stop == 0:
        raise DatasetError(f"Minari dataset {dataset.id} holds no steps")
    arrays = {
        "observations": observations,
        "actions": actions,
        "rewards": rewards,
        "next_observations": next_observations,
        "terminations": terminations,
        "truncations": truncations,
    }
    arrays = {key: value[:stop] for key, value in arrays.items()}
    episode_end = episode_end[:stop]

    # A flag ends an episode in our format. Returns are summed over the pieces between flags and Minari episode
    # ends; a piece is a complete episode when a flag ends it, not just the end of a Minari episode.
    done = arrays["terminations"] | arrays["truncations"]
    ends = np.flatnonzero(done | episode_end)
    starts = np.concatenate([[0], ends[:-1] + 1])
    piece_returns = np.add.reduceat(arrays["rewards"].astype(np.float64), starts)
    arrays["episode_returns"] = piece_returns[done[ends]].astype(np.float32)
    unfinished = episode_end & ~done
    arrays["truncations"] = arrays["truncations"] | unfinished
    counts = {
        "episodes": int(episode_end.sum()),
        "unfinished": int(unfinished.sum()),
        "flags_before_end": int((done & ~episode_end).sum()),
    }
    return arrays, counts


# ---------------------------------------------------------------------------------------------- main
def check_flags(args: Args) -> None:
    """Refuse numbers that cannot make a dataset, before Minari is read."""
    check_range("--reference-episodes", args.reference_episodes, 1)


def main() -> None:
    args = parse_flags(Args, __doc__)
    check_flags(args)
    minari = require_minari()
    dataset = open_minari_dataset(minari, args.dataset_id, args.download)
    observation_space, action_space = dataset.observation_space, dataset.action_space
    check_flat_spaces(observation_space, action_space, dataset.id)
    env_id, env = resolve_env(dataset, args.env_id)
    env.close()
    output = args.output or default_dataset_path(env_id, dataset.id.replace("/", "-"))
    prepare_output(output, args.overwrite)

    references = reference_returns(dataset, env_id, env.action_space, args)
    arrays, counts = episodes_to_transitions(dataset, isinstance(action_space, gym.spaces.Discrete))
    if counts["unfinished"]:
        print(
            f"{counts['unfinished']} of {counts['episodes']} Minari episodes end with neither a termination nor a "
            f"truncation: their last step is marked truncated (targets bootstrap there) and their returns are not "
            f"in episode_returns"
        )
    if counts["flags_before_end"]:
        print(
            f"warning: {counts['flags_before_end']} steps are terminated or truncated before the end of their "
            f"Minari episode; kept as they are, so each ends an episode in the output"
        )

    raw = dataset.storage.metadata
    source = {key: jsonable(raw[key]) for key in SOURCE_KEYS if raw.get(key) is not None}
    source["dataset_id"] = dataset.id
    if dataset.env_spec is not None:
        source["env_spec"] = {
            "id": dataset.env_spec.id,
            "kwargs": jsonable(dataset.env_spec.kwargs),
            "max_episode_steps": dataset.env_spec.max_episode_steps,
        }
    if raw.get("eval_env_spec") is not None:  # a JSON EnvSpec, set when evaluation is meant to use another env
        source["eval_env_id"] = json.loads(raw["eval_env_spec"]).get("id")
    metadata = {
        "env_id": env_id,
        "policy": "minari",
        "agent": dataset.id,
        "algo": source.get("algorithm_name"),
        "noise": None,
        "seed": None,
        "num_transitions": int(len(arrays["rewards"])),
        "num_episodes": int(len(arrays["episode_returns"])),
        "observation_space": describe_space(env.observation_space),
        "action_space": describe_space(env.action_space),
        "reference_returns": references,
        "gymnasium_version": gym.__version__,
        "minari_version": minari.__version__,
        "created_by": shlex.join(["python", *sys.argv]),
        "minari": source,
    }
    save_dataset(output, arrays, metadata, args.overwrite)
    returns = arrays["episode_returns"]
    mean_return = f"{returns.mean():.1f} +- {returns.std():.1f}" if len(returns) else "n/a (no complete episode)"
    print(
        f"wrote {output}: {len(arrays['rewards'])} transitions from {counts['episodes']} Minari episodes of "
        f"{dataset.id}, {len(returns)} complete episodes, mean return {mean_return}"
    )


if __name__ == "__main__":
    exit_on_dataset_error(main)
