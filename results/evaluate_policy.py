"""Play a trained policy: the policy.pt2 that every algorithm script writes into its run folder.

    python results/evaluate_policy.py runs/Hopper-v5__bc__expert__1__1764000000/policy.pt2
    python results/evaluate_policy.py POLICY --episodes 20 --seed 7 --capture-video

policy.pt2 is a torch.export program, raw env observations in, env actions out (observation standardisation
and action scaling inside), with the env id, reference returns and the script's evaluation settings stored
beside it as policy.json. By default this plays the episodes of the script's final evaluation (the same
seeds, batched the same way in a vector env) and so prints the same mean return on the same machine. It
needs neither the algorithm's file nor pickle, and imports nothing from this repository. In your own code:

    policy = torch.export.load("runs/.../policy.pt2").module()
    action = policy(torch.as_tensor(observation, dtype=torch.float32)[None])[0].numpy()
"""

import contextlib
import io
import json
import logging
import os
import re
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn, Optional

import gymnasium as gym
import numpy as np
import torch
import tyro


@dataclass
class Args:
    policy: tyro.conf.Positional[Path]
    """policy.pt2 written by an algorithm script (in its run folder)"""
    env_id: Optional[str] = None
    """env to play in; None: the env the policy was trained for"""
    episodes: Optional[int] = None
    """episodes, batched in a vector env; None: as many as the script's evaluations"""
    seed: Optional[int] = None
    """episode i uses env seed seed * 1000 + i (and torch's seed, for sampled actions); None: the script's seed"""
    capture_video: bool = False
    """record the first episode to policy_videos/ beside the policy file"""


WHERE = "an algorithm script writes policy.pt2 into its run folder (runs/<run>/policy.pt2)"


def fail(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def read_flags(argv: Optional[list[str]] = None) -> Args:
    """The flags, checked. tyro's box of many lines for a bad flag becomes one line (as data_collection/dataset_io.py's
    parse_flags does; this file imports nothing from the repository)."""
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            args = tyro.cli(Args, args=argv, description=__doc__)
    except SystemExit as stop:
        if not stop.code:  # --help
            raise
        text, argv = captured.getvalue(), sys.argv[1:] if argv is None else list(argv)
        found = re.search(r"Error parsing (--[\w-]+)", text)
        if found is not None:  # a value that does not parse: the whole numbers --episodes and --seed
            flag = found.group(1)
            given = [value for i, token in enumerate(argv) if token == flag for value in argv[i + 1 : i + 2]]
            given += [token.split("=", 1)[1] for token in argv if token.startswith(f"{flag}=")]
            message = f"{flag} takes a whole number" + (f", got {given[-1]}" if given else "")
        else:  # unknown or missing flags: the first part of the box, its lines joined
            lines = [line.strip("│╭╮╰╯─ ") for line in text.splitlines()] + [""]
            message = " ".join(lines[1 : lines.index("", 1)]).rstrip(".")
        if not message:  # a box of another shape: tyro's own words, as they are
            sys.stderr.write(text)
            raise
        fail(f"{message}; see --help")
    check_flags(args)
    return args


def check_flags(args: Args) -> None:
    """Refuse counts that cannot make an evaluation, before the policy is loaded."""
    if args.episodes is not None and args.episodes < 1:
        fail(f"--episodes must be at least 1, got {args.episodes}")
    if args.seed is not None and args.seed < 0:
        fail(f"--seed must be at least 0, got {args.seed}")


class KeptRecords(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def torch_export_log_kept():
    """On an archive it cannot read, torch.export.load logs its own traceback (some 20 lines) before it raises: keep
    those records out of the user's terminal, for the one line that says what is wrong with the file."""
    logger = logging.getLogger("torch.export")
    kept, saved = KeptRecords(), (logger.handlers, logger.propagate)
    logger.handlers, logger.propagate = [kept], False
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield kept
    finally:
        logger.handlers, logger.propagate = saved


def load_error(error: Exception, kept: KeptRecords) -> str:
    """The cause of a failed torch.export.load: the error it logged (its own only says "see the warnings above")."""
    logged = [record.exc_info[1] for record in kept.records if record.exc_info and record.exc_info[1] is not None]
    cause = logged[-1] if logged else error
    text = re.sub(r"\[enforce fail at [^\]]*\]\s*\.?\s*", "", str(cause).strip().splitlines()[-1] if str(cause) else "")
    return f"{type(cause).__name__}: {text}" if text else type(cause).__name__


def policy_info_problem(info) -> Optional[str]:
    """What in policy.json the player needs is missing or of the wrong kind, or None."""
    if not isinstance(info, dict):
        return "its policy.json is not a JSON object"
    if not isinstance(info.get("env_id"), str) or not isinstance(info.get("algorithm"), str):
        return "its policy.json lacks env_id or algorithm"
    shape = info.get("observation_shape")
    if not (isinstance(shape, list) and all(isinstance(size, int) for size in shape)):
        return "its policy.json lacks the observation_shape"
    for key in ("evaluation", "action_space", "reference_returns"):
        if info.get(key) is not None and not isinstance(info[key], dict):
            return f"its policy.json's {key} is not a JSON object"
    return None


def load_policy(path: Path) -> tuple[torch.nn.Module, dict]:
    """The acting module and its policy.json, or one line that says why the file cannot be played."""
    if path.is_dir():
        inside = path / "policy.pt2"
        fail(
            f"{path} is a folder; give the policy file in it: {inside}"
            if inside.is_file()
            else f"{path} is a folder, not a policy file; {WHERE}"
        )
    if not path.is_file():
        fail(f"{path} does not exist; {WHERE}")
    foreign = f"{path} is not a policy.pt2 written by this project's scripts"
    if path.stat().st_size == 0:
        fail(f"{foreign} (the file is empty); {WHERE}")
    if not zipfile.is_zipfile(path):
        fail(f"{foreign} (it is not a zip archive: cut short, or another kind of file); {WHERE}")
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
        damaged = None if damaged is None else f"{damaged} fails its CRC check"
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        damaged = f"{type(error).__name__}: {error}"
    if damaged is not None:
        fail(f"{path} is damaged ({damaged}); {WHERE}")
    extra_files = {"policy.json": ""}
    problem = None
    with torch_export_log_kept() as kept:
        try:
            program = torch.export.load(str(path), extra_files=extra_files)
        except Exception as error:  # torch.export raises many kinds on a damaged or foreign archive
            problem = load_error(error, kept)
    if problem is not None:  # said once stderr is the user's again
        fail(f"{foreign} ({problem}); {WHERE}")
    if not extra_files["policy.json"]:
        fail(f"{foreign} (it holds no policy.json); {WHERE}")
    try:
        info = json.loads(extra_files["policy.json"])
    except ValueError as error:
        fail(f"{foreign} (its policy.json is not JSON: {error}); {WHERE}")
    problem = policy_info_problem(info)
    if problem is not None:
        fail(f"{foreign} ({problem}); {WHERE}")
    return program.module(), info


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


def check_action_space(path: Path, info: dict, env_id: str, space: gym.Space) -> None:
    """The policy's actions must be the env's kind, count or shape, and bounds (a policy scales its actions to the
    bounds it was trained in). A policy.json without action_space (older files) is played as it is."""
    described = info.get("action_space")
    if not described:
        return
    own = info["env_id"]
    if "n" in described:
        if not isinstance(space, gym.spaces.Discrete):
            fail(
                f"{path} chooses among {described['n']} discrete actions, env {env_id} takes continuous actions "
                f"{space}; play it on an env of discrete actions, such as its own {own}"
            )
        if int(space.n) != described["n"]:
            fail(f"{path} chooses among {described['n']} actions, env {env_id} has {space.n}; play it on {own}")
        return
    low, high = np.asarray(described.get("low", []), dtype=float), np.asarray(described.get("high", []), dtype=float)
    if not isinstance(space, gym.spaces.Box):
        fail(
            f"{path} gives continuous actions of shape {low.shape}, env {env_id} takes discrete actions {space}; "
            f"play it on an env of continuous (Box) actions, such as its own {own}"
        )
    if space.shape != low.shape or not (np.allclose(space.low, low) and np.allclose(space.high, high)):
        fail(
            f"{path} gives actions of shape {low.shape} in [{low.tolist()}, {high.tolist()}], env {env_id} takes "
            f"{space.shape} in [{space.low.tolist()}, {space.high.tolist()}]; play it on {own}"
        )


def prepare_rendering(env_id: str) -> None:
    """Check that env_id can render before playing. Without a screen MuJoCo needs MUJOCO_GL=egl or osmesa, read once
    when mujoco is imported, so each is tried in a child process; the first that renders is kept."""
    # The child silences MuJoCo's warnings about gymnasium's models, or it leaves a MUJOCO_LOG.TXT in the folder.
    probe = (
        "import sys, gymnasium as g\n"
        "if 'mujoco' in str(g.spec(sys.argv[1]).entry_point):\n"
        "    import mujoco; mujoco.set_mju_user_warning(lambda message: None)\n"
        "e = g.make(sys.argv[1], render_mode='rgb_array'); e.reset(); e.render()"
    )
    headless = not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
    backends = [os.environ.get("MUJOCO_GL")] if "MUJOCO_GL" in os.environ or not headless else ["egl", "osmesa"]
    for backend in backends:
        env = dict(os.environ, **({"MUJOCO_GL": backend} if backend else {}))
        result = subprocess.run([sys.executable, "-c", probe, env_id], env=env, capture_output=True, text=True)
        if result.returncode == 0:
            os.environ.update({"MUJOCO_GL": backend} if backend else {})
            return
        reason = (result.stderr.strip().splitlines() or ["no output"])[-1]
    fail(
        f"--capture-video cannot render {env_id} (MUJOCO_GL={'/'.join(map(str, backends))}: {reason}). Without a "
        "screen MuJoCo renders with EGL or OSMesa: install one (apt install libegl1 or libosmesa6), or drop "
        "--capture-video"
    )


def play(policy, env_id: str, episodes: int, seed: int, video_folder: Optional[Path]) -> dict:
    """The episodes of an algorithm script's evaluation: batched in a vector env that resets a finished episode in
    the same step, env seeds seed * 1000 + i, torch seeded with `seed` for the random numbers a sampling policy
    draws, every episode acted for at every step. Returns mean_return, std_return and the returns."""

    def make_env(index: int) -> gym.Env:
        if video_folder is None or index > 0:
            return gym.make(env_id)
        video = dict(episode_trigger=lambda episode: episode == 0, name_prefix="policy", disable_logger=True)
        return gym.wrappers.RecordVideo(gym.make(env_id, render_mode="rgb_array"), str(video_folder), **video)

    same_step = gym.vector.AutoresetMode.SAME_STEP
    envs = gym.vector.SyncVectorEnv([lambda i=i: make_env(i) for i in range(episodes)], autoreset_mode=same_step)
    observations, _ = envs.reset(seed=[seed * 1000 + i for i in range(episodes)])
    returns, running = np.zeros(episodes), np.ones(episodes, dtype=bool)
    torch.manual_seed(seed)
    with torch.no_grad():
        while running.any():
            actions = policy(torch.tensor(observations, dtype=torch.float32))
            observations, rewards, terminations, truncations, _ = envs.step(actions.numpy())
            returns += np.where(running, rewards, 0.0)
            running &= ~(terminations | truncations)
    envs.close()
    return {"mean_return": float(returns.mean()), "std_return": float(returns.std()), "returns": returns.tolist()}


def normalized_score(mean_return: float, references: Optional[dict]) -> Optional[float]:
    """D4RL's normalised score: 0 is a uniform random policy, 100 the expert of the dataset's references."""
    random, expert = (references or {}).get("random"), (references or {}).get("expert")
    numbers = all(isinstance(value, (int, float)) and not isinstance(value, bool) for value in (random, expert))
    if not numbers or expert == random:  # no scale to score on
        return None
    return 100.0 * (mean_return - random) / (expert - random)


def main() -> None:
    args = read_flags()
    torch.set_num_threads(1)
    policy, info = load_policy(args.policy)
    evaluation = info.get("evaluation") or {}
    env_id = args.env_id or info["env_id"]
    episodes = args.episodes if args.episodes is not None else evaluation.get("episodes", 10)
    seed = args.seed if args.seed is not None else evaluation.get("seed", 1)
    if not (isinstance(episodes, int) and isinstance(seed, int) and episodes >= 1 and seed >= 0):
        fail(f"{args.policy}'s policy.json gives {episodes} episodes and seed {seed}; pass --episodes and --seed")
    try:
        quiet_mujoco_deprecations(env_id)
        probe_env = gym.make(env_id)
    except gym.error.Error as error:
        fail(f"cannot make env {env_id!r}: {error}")
    check_action_space(args.policy, info, env_id, probe_env.action_space)
    if probe_env.observation_space.shape != tuple(info["observation_shape"]):
        fail(
            f"{args.policy} takes observations of shape {tuple(info['observation_shape'])}, env {env_id} gives "
            f"{probe_env.observation_space.shape}"
        )
    probe_env.close()
    if args.capture_video:
        prepare_rendering(env_id)
    video_folder = args.policy.parent / "policy_videos" if args.capture_video else None
    result = play(policy, env_id, episodes, seed, video_folder)
    line = (
        f"{info['algorithm']} on {env_id}: return {result['mean_return']:.1f} ± {result['std_return']:.1f} over "
        f"{episodes} episodes (seed {seed})"
    )
    score = normalized_score(result["mean_return"], info.get("reference_returns"))
    print(line if score is None else f"{line}, normalised score {score:.1f}")
    if video_folder is not None:
        print(f"video in {video_folder}")


if __name__ == "__main__":
    main()
