"""Learning curve of d3rlpy 2.8.1's TD3PlusBC or IQL on one of our datasets: a check of our scripts on the same data.

Runs in d3rlpy's own venv (it pins its own gymnasium), with MuJoCo for the Hopper evaluation:

    python3 -m venv .venv-d3rlpy && .venv-d3rlpy/bin/pip install torch==2.13.0 d3rlpy==2.8.1 mujoco imageio
    .venv-d3rlpy/bin/python results/d3rlpy_learning.py --dataset datasets/tuning/Hopper-v5/medium-expert.npz --seed 7

The settings are the papers' (d3rlpy's reproduction scripts): TD3PlusBC with alpha 2.5, IQL with expectile 0.7,
beta 3 and rewards scaled by 1000 / the range of the episodes' returns; observations standardised. Every
--eval-freq steps it plays --eval-episodes deterministic episodes with seeds seed * 1000 + i, as our scripts
do, and prints one JSON line: {"step", "mean_return", "std_return", "wall_time_s"}.
"""

import argparse
import json
import sys
import time
from pathlib import Path
from typing import NoReturn, Optional

import gymnasium as gym
import numpy as np

COLLECTOR = "data_collection/collect_dataset.py"


class Parser(argparse.ArgumentParser):
    """argparse, with a bad flag said in one line (argparse's own error prints the usage line before it)."""

    def error(self, message: str) -> NoReturn:
        fail(f"{message}; see --help")


def fail(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """The flags, checked before d3rlpy is imported."""
    parser = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, help="dataset file (.npz) of data_collection/collect_dataset.py")
    parser.add_argument("--algo", default="TD3PlusBC", choices=["TD3PlusBC", "IQL"])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--total-steps", type=int, default=100_000)
    parser.add_argument("--eval-freq", type=int, default=10_000)
    parser.add_argument("--eval-episodes", type=int, default=10)
    args = parser.parse_args(argv)
    for flag, minimum in (("seed", 0), ("total_steps", 1), ("eval_freq", 1), ("eval_episodes", 1)):
        if getattr(args, flag) < minimum:
            fail(f"--{flag.replace('_', '-')} must be at least {minimum}, got {getattr(args, flag)}")
    if args.eval_freq > args.total_steps:  # no evaluation would ever run: nothing printed
        fail(f"--eval-freq {args.eval_freq} is above --total-steps {args.total_steps}: no evaluation would run")
    return args


def read_dataset(path: str) -> tuple[dict[str, np.ndarray], str]:
    """The arrays of a dataset file and its env id, or one line that says what is wrong with it (this file imports
    nothing from the repository, so not data_collection/dataset_io.py's checks)."""
    keys = ("observations", "actions", "rewards", "terminations", "truncations")
    if Path(path).is_dir():
        fail(f"{path} is a folder, not a dataset file (.npz)")
    if not Path(path).is_file():
        fail(f"dataset {path} does not exist; build it with {COLLECTOR}")
    try:
        with np.load(path, allow_pickle=False) as file:
            arrays = {key: file[key] for key in keys}
            env_id = json.loads(str(file["metadata"]))["env_id"]
    except Exception as error:  # numpy, zipfile, zlib and json each raise their own kind for a damaged file
        fail(f"cannot read {path} ({type(error).__name__}: {error}); collect it again ({COLLECTOR})")
    if any(array.dtype.kind not in "fiub" for array in arrays.values()) or not isinstance(env_id, str):
        fail(f"{path}: its arrays are not all numbers, or its env_id is not text; collect it again ({COLLECTOR})")
    return arrays, env_id


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


def main() -> None:
    import d3rlpy
    import torch

    args = parse_args()
    file, env_id = read_dataset(args.dataset)
    try:
        quiet_mujoco_deprecations(env_id)
    except gym.error.Error as error:
        fail(f"cannot make env {env_id!r} of {args.dataset}: {error}")
    torch.set_num_threads(1)
    d3rlpy.seed(args.seed)
    dataset = d3rlpy.dataset.MDPDataset(
        file["observations"],
        file["actions"],
        file["rewards"],
        file["terminations"],
        timeouts=file["truncations"] & ~file["terminations"],
    )
    scaler = d3rlpy.preprocessing.StandardObservationScaler()
    if args.algo == "TD3PlusBC":
        config = d3rlpy.algos.TD3PlusBCConfig(
            actor_learning_rate=3e-4,
            critic_learning_rate=3e-4,
            batch_size=256,
            alpha=2.5,
            target_smoothing_sigma=0.2,
            target_smoothing_clip=0.5,
            update_actor_interval=2,
            observation_scaler=scaler,
        )
    else:
        config = d3rlpy.algos.IQLConfig(
            actor_learning_rate=3e-4,
            critic_learning_rate=3e-4,
            batch_size=256,
            expectile=0.7,
            weight_temp=3.0,
            max_weight=100.0,
            observation_scaler=scaler,
            reward_scaler=d3rlpy.preprocessing.ReturnBasedRewardScaler(multiplier=1000.0),
        )
    algo = config.create(device="cpu:0")
    fit = dict(
        n_steps_per_epoch=args.eval_freq,
        show_progress=False,
        save_interval=10**9,
        logger_adapter=d3rlpy.logging.NoopAdapterFactory(),
    )
    start = time.time()
    for step in range(args.eval_freq, args.total_steps + 1, args.eval_freq):
        algo.fit(dataset, n_steps=args.eval_freq, **fit)  # each call goes on from the last (same networks, optimisers)
        returns = []
        for episode in range(args.eval_episodes):
            env = gym.make(env_id)
            observation, _ = env.reset(seed=args.seed * 1000 + episode)
            total, over = 0.0, False
            while not over:
                action = algo.predict(observation[None].astype(np.float32))[0]
                observation, reward, terminated, truncated, _ = env.step(action)
                total, over = total + float(reward), terminated or truncated
            returns.append(total)
            env.close()
        print(
            json.dumps(
                {
                    "step": step,
                    "mean_return": float(np.mean(returns)),
                    "std_return": float(np.std(returns)),
                    "wall_time_s": round(time.time() - start, 1),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
