"""Play a trained policy: the policy.pt2 that every algorithm script writes into its run folder.

    python results/evaluate_policy.py runs/Hopper-v5__bc__expert__1__1764000000/policy.pt2
    python results/evaluate_policy.py POLICY --episodes 20 --seed 7 --capture-video

policy.pt2 is a torch.export program, raw env observations in, env actions out (observation standardisation
and action scaling inside), with the env id, reference returns and the script's evaluation settings stored
beside it as policy.json. By default this plays the episodes of the script's final evaluation (the same
seeds, batched the same way in a vector env) and so prints the same mean return on the same machine. It
needs neither the algorithm's file nor pickle. In your own code:

    policy = torch.export.load("runs/.../policy.pt2").module()
    action = policy(torch.as_tensor(observation, dtype=torch.float32)[None])[0].numpy()
"""

import json
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn, Optional

import gymnasium as gym
import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "algorithms"))
import bc  # noqa: E402  every script evaluates and checks rendering the same way; bc.py's copy serves here


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
        fail(f"{args.policy} takes observations of shape {tuple(info['observation_shape'])}, env {env_id} gives "
             f"{probe_env.observation_space.shape}")
    probe_env.close()
    if args.capture_video:
        bc.prepare_rendering(env_id)
    video_folder = args.policy.parent / "policy_videos" if args.capture_video else None
    torch.manual_seed(seed)  # what a sampling policy (BCQ's) draws: its script's evaluation seeds it the same way
    result = bc.evaluate(policy, env_id, episodes, seed, evaluation.get("gamma", 0.99), torch.device("cpu"),
                         info.get("reference_returns"), video_folder, "policy")
    line = (f"{info['algorithm']} on {env_id}: return {result['mean_return']:.1f} ± {result['std_return']:.1f} over "
            f"{episodes} episodes (seed {seed})")
    score = result["normalized_score"]
    print(line if score is None else f"{line}, normalised score {score:.1f}")
    if video_folder is not None:
        print(f"video in {video_folder}")


if __name__ == "__main__":
    main()
