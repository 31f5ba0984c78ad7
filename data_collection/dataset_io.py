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

import contextlib
import io
import json
import math
import os
import re
import sys
import tempfile
import time
import typing
import zipfile
from pathlib import Path
from typing import Any, Callable, Optional

import gymnasium as gym
import numpy as np
import tyro

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

REMEDY = "collect it again (data_collection/collect_dataset.py) or restore a copy"


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


def flattened_types(hint: Any) -> set:
    """The types inside a type hint: {int, NoneType} for Optional[int], {int, Ellipsis} for tuple[int, ...]."""
    inner = typing.get_args(hint)
    return set().union(*map(flattened_types, inner)) if inner else {hint}


def parse_flags(args_class: type, description: Optional[str], args: Optional[list[str]] = None):
    """tyro.cli, with tyro's box of many lines for bad flags made one line: a value it cannot parse (nan or inf for a
    whole number, a word for a number) names the flag and what it takes. --help is unchanged."""
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            return tyro.cli(args_class, description=description, args=args)
    except SystemExit as stop:
        if not stop.code:  # --help
            raise
        text = captured.getvalue()
        found = re.search(r"Error parsing (--[\w-]+)", text)
        if found is not None:
            flag = found.group(1)
            argv = sys.argv[1:] if args is None else list(args)
            given = [value for i, token in enumerate(argv) if token == flag for value in argv[i + 1 : i + 2]]
            given += [token.split("=", 1)[1] for token in argv if token.startswith(f"{flag}=")]
            types = flattened_types(typing.get_type_hints(args_class).get(flag[2:].replace("-", "_")))
            kind = "a whole number" if int in types else "a number" if float in types else "another value"
            message = f"{flag} takes {kind}" + (f", got {given[-1]}" if given else "")
        else:  # unknown or missing flags: the first part of the box, its lines joined
            lines = [line.strip("│╭╮╰╯─ ") for line in text.splitlines()] + [""]
            message = " ".join(lines[1 : lines.index("", 1)]).rstrip(".")
        if not message:  # a box of another shape: tyro's own words, as they are
            sys.stderr.write(text)
            raise
        print(f"error: {message}; see --help", file=sys.stderr)
        sys.exit(2)


def check_range(flag: str, value: Optional[float], minimum: float, maximum: float = math.inf, above: bool = False):
    """A number flag must be finite and from `minimum` (exclusive if `above`) to `maximum`; None is left to the
    caller. Raises a DatasetError that names the flag."""
    if value is None:
        return
    low_ok = value > minimum if above else value >= minimum
    if math.isfinite(value) and low_ok and value <= maximum:
        return
    if math.isfinite(maximum):
        bounds = f"between {minimum:g} and {maximum:g}"
    else:
        bounds = f"above {minimum:g}" if above else f"at least {minimum:g}"
    number = "a finite number " if isinstance(value, float) else ""  # NaN and infinity are floats
    raise DatasetError(f"{flag} must be {number}{bounds}, got {value}")


def quiet_mujoco_deprecations(env_id: str) -> None:
    """MuJoCo warns, on stderr and in a MUJOCO_LOG.TXT in the current folder, about attributes of gymnasium's own
    models (HalfCheetah's settotalmass) each time one is made: not the user's to fix. Its other warnings still print."""
    if "mujoco" not in str(gym.spec(env_id).entry_point):
        return
    import mujoco

    def warn(message: str) -> None:
        if "is deprecated" not in message:
            print(f"MuJoCo warning: {message}", file=sys.stderr)

    mujoco.set_mju_user_warning(warn)


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


# What the tools read from the metadata, each with the JSON types it may have (None: JSON null).
METADATA_TYPES = {
    "env_id": ((str,), "a gymnasium env id (text)"),
    "policy": ((str,), "text"),
    "agent": ((str, type(None)), "text or null"),
    "num_transitions": ((int,), "a whole number"),
    "created_by": ((str,), "text"),
    "reference_returns": ((dict,), 'a JSON object {"random": ..., "expert": ...}'),
    "observation_space": ((dict, type(None)), "a JSON object or null"),
    "action_space": ((dict, type(None)), "a JSON object or null"),
    "collection_seconds": ((int, float, type(None)), "a number or null"),
}


def json_text(value: Any, limit: int = 60) -> str:
    """A metadata value as the file holds it, cut to `limit` characters for a one-line message."""
    text = json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_metadata(metadata: dict[str, Any], source: str) -> None:
    """Raise DatasetError unless the metadata fields the tools read have the types the collectors write."""
    for key, (types, expected) in METADATA_TYPES.items():
        value = metadata.get(key)
        if key in metadata and (not isinstance(value, types) or isinstance(value, bool)):
            raise DatasetError(f"{source}: the metadata's {key} is {json_text(value)}, expected {expected}; {REMEDY}")
    for key in ("random", "expert"):
        value = metadata["reference_returns"].get(key)
        number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not (value is None or number):
            raise DatasetError(
                f"{source}: the metadata's reference_returns.{key} is {json_text(value)}, expected a finite number "
                f"or null; {REMEDY}"
            )


def check_dataset(arrays: dict[str, np.ndarray], metadata: dict[str, Any], source: str) -> None:
    """Raise DatasetError unless the arrays and metadata follow the format above."""
    missing = [key for key in ARRAY_KEYS if key not in arrays]
    if missing:
        raise DatasetError(f"{source} is not a dataset of this project: it lacks {', '.join(missing)}")
    missing_metadata = [key for key in REQUIRED_METADATA if key not in metadata]
    if missing_metadata:
        raise DatasetError(f"{source}: metadata lacks {', '.join(missing_metadata)}")
    check_metadata(metadata, source)
    num = len(arrays["rewards"]) if arrays["rewards"].ndim else 0
    expected = {
        "observations": (np.float32, 2),
        "next_observations": (np.float32, 2),
        "rewards": (np.float32, 1),
        "terminations": (np.bool_, 1),
        "truncations": (np.bool_, 1),
        "episode_returns": (np.float32, 1),
    }
    for key in ARRAY_KEYS:
        if arrays[key].dtype.kind not in "fiub":  # text, bytes, dates: nothing a model can learn from
            raise DatasetError(f"{source}: {key} are {arrays[key].dtype}, not numbers; {REMEDY}")
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


def read_error(error: Exception, key: Optional[str]) -> str:
    """What a failure of np.load (or of reading the array `key`) says about the file, in words."""
    if "Object arrays cannot be loaded" in str(error):
        return f"its array {key or ''} holds Python objects, which a dataset never does".replace("  ", " ")
    if "pickled" in str(error):  # np.load's guess for a file that is neither .npz nor .npy
        return "it is not a .npz file"
    if isinstance(error, zipfile.BadZipFile) and "not a zip file" in str(error):
        return "it is not a whole .npz file (cut short, or damaged)"
    return f"it is damaged ({type(error).__name__}: {error})"


def read_npz(path: Path) -> dict[str, np.ndarray]:
    """Every array of an .npz file, or a DatasetError of one line that says what is wrong with the file."""
    if path.is_dir():
        raise DatasetError(f"{path} is a folder, not a dataset file; give the .npz files in it, e.g. {path}/*.npz")
    if not path.is_file():
        raise DatasetError(
            f"dataset {path} does not exist; build one with: python data_collection/collect_dataset.py --help"
        )
    key = None
    try:
        if path.stat().st_size == 0:
            raise DatasetError(f"cannot read {path}: the file is empty; {REMEDY}")
        with open(path, "rb") as handle:
            file = np.load(handle, allow_pickle=False)
            if not isinstance(file, np.lib.npyio.NpzFile):
                raise DatasetError(f"cannot read {path}: it holds one array (.npy), not a dataset's arrays (.npz)")
            with file:
                contents = {}
                for key in file.files:
                    contents[key] = file[key]
    except DatasetError:
        raise
    except PermissionError as error:
        raise DatasetError(f"cannot read {path}: {error.strerror}") from None
    except Exception as error:  # numpy, zipfile, zlib and the OS each raise their own kind for a damaged file
        raise DatasetError(f"cannot read {path}: {read_error(error, key)}; {REMEDY}") from None
    return contents


def parse_metadata(value: np.ndarray, path: Path) -> dict[str, Any]:
    """The metadata array's JSON object."""
    try:
        metadata = json.loads(str(value))
    except ValueError as error:  # json's JSONDecodeError is a ValueError
        raise DatasetError(f"cannot read {path}: its metadata is not JSON ({error}); {REMEDY}") from None
    if not isinstance(metadata, dict):
        found = "a list" if isinstance(metadata, list) else json_text(metadata)
        raise DatasetError(f"{path} is not a dataset of this project: its metadata is {found}, not a JSON object")
    return metadata


def load_dataset(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Load and check a dataset file; returns (arrays, metadata). Whatever is wrong with it is one DatasetError."""
    path = Path(path)
    contents = read_npz(path)
    if "metadata" not in contents:
        raise DatasetError(f"{path} is not a dataset of this project: it has no metadata")
    metadata = parse_metadata(contents.pop("metadata"), path)
    check_dataset(contents, metadata, str(path))
    return contents, metadata
