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
import time

import d3rlpy
import gymnasium as gym
import numpy as np
import torch

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--dataset", required=True, help="dataset file (.npz) of data_collection/collect_dataset.py")
parser.add_argument("--algo", default="TD3PlusBC", choices=["TD3PlusBC", "IQL"])
parser.add_argument("--seed", type=int, default=1)
parser.add_argument("--total-steps", type=int, default=100_000)
parser.add_argument("--eval-freq", type=int, default=10_000)
parser.add_argument("--eval-episodes", type=int, default=10)
args = parser.parse_args()
torch.set_num_threads(1)
d3rlpy.seed(args.seed)

with np.load(args.dataset) as file:
    env_id = json.loads(str(file["metadata"]))["env_id"]
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
