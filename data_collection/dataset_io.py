"""Reading, checking and writing offline datasets, shared by the collectors, in the format below (README.md's
section "The dataset file" gives the same table with what each key means).

One `.npz` file per dataset (numpy.savez_compressed, loadable with allow_pickle=False):
    observations       float32 [N, obs_dim]   raw env observation
    actions            int64 [N] (Discrete) or float32 [N, act_dim] (Box)
    rewards            float32 [N]
    next_observations  float32 [N, obs_dim]   at an episode end: the final observation, not the reset one
    terminations       bool [N]               true terminal state: no bootstrapping
    truncations        bool [N]               episode cut (time limit, end of collection): bootstrap
    episode_returns    float32 [E]            undiscounted return of each complete episode
    metadata           0-d str (JSON)         env_id, policy, agent, noise, seed, reference_returns, ...
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import gymnasium as gym
import numpy as np

ARRAY_KEYS = (
    "observations",
    "actions",
    "rewards",
    "next_observations",
    "terminations",
    "truncations",
    "episode_returns",
)
REQUIRED_METADATA = (
    "env_id",
    "policy",
    "agent",
    "noise",
    "seed",
    "num_transitions",
    "gymnasium_version",
    "created_by",
    "reference_returns",
)


class DatasetError(Exception):
    """A problem the user can fix (bad flag, missing file, mismatched spaces): printed without a traceback."""


def exit_on_dataset_error(main: Callable[[], None]) -> None:
    """Run `main`; a DatasetError becomes one line on stderr and exit status 2."""
    try:
        main()
    except DatasetError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: nothing was written", file=sys.stderr)
        sys.exit(130)


def describe_space(space: gym.Space) -> dict[str, Any]:
    """A JSON-able description of an observation or action space, stored in the metadata and compared on mixing."""
    if isinstance(space, gym.spaces.Discrete):
        return {"type": "Discrete", "n": int(space.n)}
    if isinstance(space, gym.spaces.Box):
        return {"type": "Box", "shape": list(space.shape), "low": space.low.tolist(), "high": space.high.tolist()}
    return {"type": type(space).__name__}


def default_dataset_path(env_id: str, policy: str) -> Path:
    return Path("datasets") / env_id / f"{policy}.npz"


def prepare_output(path: Path, overwrite: bool) -> None:
    """Fail before any work is done if the dataset exists (without --overwrite) or its folder is not writable."""
    if path.suffix != ".npz":
        raise DatasetError(f"--output must end in .npz, got {path}")
    if path.is_dir():
        raise DatasetError(f"--output {path} is a folder; give a file name ending in .npz")
    if path.exists() and not overwrite:
        raise DatasetError(f"{path} already exists; pass --overwrite to replace it, or choose another --output")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".probe"):
            pass
    except OSError as error:
        raise DatasetError(
            f"cannot write to the folder {path.parent}: {error.strerror or error}; choose another --output"
        ) from None


def check_dataset(arrays: dict[str, np.ndarray], metadata: dict[str, Any], source: str) -> None:
    """Raise DatasetError unless the arrays and metadata follow the format above."""
    missing = [key for key in ARRAY_KEYS if key not in arrays]
    if missing:
        raise DatasetError(f"{source} is not a dataset of this project: it lacks {', '.join(missing)}")
    missing_metadata = [key for key in REQUIRED_METADATA if key not in metadata]
    if missing_metadata:
        raise DatasetError(f"{source}: metadata lacks {', '.join(missing_metadata)}")
    num = len(arrays["rewards"])
    expected = {
        "observations": (np.float32, 2),
        "next_observations": (np.float32, 2),
        "rewards": (np.float32, 1),
        "terminations": (np.bool_, 1),
        "truncations": (np.bool_, 1),
        "episode_returns": (np.float32, 1),
    }
    for key, (dtype, ndim) in expected.items():
        if arrays[key].dtype != dtype or arrays[key].ndim != ndim:
            raise DatasetError(
                f"{source}: {key} is {arrays[key].dtype} with {arrays[key].ndim} dims, "
                f"expected {np.dtype(dtype)} with {ndim}"
            )
    actions = arrays["actions"]
    if not ((actions.dtype == np.int64 and actions.ndim == 1) or (actions.dtype == np.float32 and actions.ndim == 2)):
        raise DatasetError(
            f"{source}: actions are {actions.dtype} {actions.shape}, expected int64 [N] or float32 [N, act_dim]"
        )
    for key in ("observations", "actions", "next_observations", "terminations", "truncations"):
        if len(arrays[key]) != num:
            raise DatasetError(f"{source}: {key} has {len(arrays[key])} rows but rewards has {num}")
    if arrays["observations"].shape != arrays["next_observations"].shape:
        raise DatasetError(
            f"{source}: observations {arrays['observations'].shape} "
            f"!= next_observations {arrays['next_observations'].shape}"
        )


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, but another user's
        pass
    return True


def remove_stale_temporaries(path: Path) -> None:
    """Remove the temporary files of writers of `path` that were killed (SIGKILL, power loss) before they could.

    Their names hold the writer's PID: those of a process that is gone are removed. Names without a PID (written by
    earlier versions of this module) are removed once an hour old, long after any save would have finished.
    """
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(?:(\d+)\.)?[a-z0-9_]+\.(?:tmp|probe)")
    for entry in path.parent.iterdir():
        match = pattern.fullmatch(entry.name)
        if match is None:
            continue
        pid = match.group(1)
        try:
            in_use = process_alive(int(pid)) if pid else time.time() - entry.stat().st_mtime < 3600
            if not in_use:
                entry.unlink()
        except (OSError, OverflowError):  # gone meanwhile, not ours to remove, or no PID can be that large
            pass


def umask_file_mode() -> int:
    """The mode open() gives a new file under the user's umask; mkstemp's 0600 would hide datasets from others."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def save_dataset(path: Path, arrays: dict[str, np.ndarray], metadata: dict[str, Any], overwrite: bool) -> None:
    """Check, then write to a temporary file in the same folder and rename it: a crash never leaves half a file."""
    check_dataset(arrays, metadata, str(path))
    if path.exists() and not overwrite:
        raise DatasetError(f"{path} appeared while collecting; pass --overwrite to replace it")
    remove_stale_temporaries(path)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            np.savez_compressed(
                file, **{key: arrays[key] for key in ARRAY_KEYS}, metadata=np.array(json.dumps(metadata))
            )
            file.flush()
            os.fchmod(file.fileno(), umask_file_mode())
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def load_dataset(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Load and check a dataset file; returns (arrays, metadata)."""
    if not path.is_file():
        raise DatasetError(
            f"dataset {path} does not exist; build one with: python data_collection/collect_dataset.py --help"
        )
    try:
        with np.load(path, allow_pickle=False) as file:
            contents = {key: file[key] for key in file.files}
    except (OSError, ValueError) as error:
        raise DatasetError(f"{path} is not a readable .npz dataset: {error}") from None
    if "metadata" not in contents:
        raise DatasetError(f"{path} is not a dataset of this project: it has no metadata")
    metadata = json.loads(str(contents.pop("metadata")))
    check_dataset(contents, metadata, str(path))
    return contents, metadata
