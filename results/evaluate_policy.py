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

import json
import os
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


def fail(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def load_policy(path: Path) -> tuple[torch.nn.Module, dict]:
    """The acting module and its policy.json, or one line that says why the file cannot be played."""
    if not path.is_file():
        fail(f"{path} does not exist; an algorithm script writes policy.pt2 into its run folder (runs/...)")
    if not zipfile.is_zipfile(path):
        fail(f"{path} is not a policy.pt2 written by this project's scripts (it is not a zip archive)")
    extra_files = {"policy.json": ""}
    try:
        program = torch.export.load(str(path), extra_files=extra_files)
        info = json.loads(extra_files["policy.json"])
    except Exception as error:  # torch.export raises many kinds on a damaged or foreign archive
        fail(f"{path} is not a policy.pt2 written by this project's scripts ({type(error).__name__}: {error})")
    return program.module(), info


def prepare_rendering(env_id: str) -> None:
    """Check that env_id can render before playing. Without a screen MuJoCo needs MUJOCO_GL=egl or osmesa, read once
    when mujoco is imported, so each is tried in a child process; the first that renders is kept."""
    probe = "import sys, gymnasium as g; e = g.make(sys.argv[1], render_mode='rgb_array'); e.reset(); e.render()"
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
    if not references or references.get("expert") is None:
        return None
    return 100.0 * (mean_return - references["random"]) / (references["expert"] - references["random"])


def main() -> None:
    args = tyro.cli(Args)
    torch.set_num_threads(1)
    policy, info = load_policy(args.policy)
    evaluation = info.get("evaluation", {})
    env_id = args.env_id or info["env_id"]
    episodes = args.episodes if args.episodes is not None else evaluation.get("episodes", 10)
    seed = args.seed if args.seed is not None else evaluation.get("seed", 1)
    if episodes < 1 or seed < 0:
        fail(f"--episodes must be at least 1 and --seed at least 0 (got {episodes} and {seed})")
    try:
        probe_env = gym.make(env_id)
    except gym.error.Error as error:
        fail(f"cannot make env {env_id!r}: {error}")
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
