"""Gradient updates per second of one d3rlpy 2.8.1 algorithm on one of our datasets (run by benchmark_speed.py).

It runs in the separate venv that benchmark_speed.py creates (d3rlpy pins its own gymnasium), so it imports
nothing from this repo. The settings come as one JSON object, for example

    python results/d3rlpy_speed.py --algo DiscreteCQL --dataset datasets/LunarLander-v3/expert.npz \
        --steps 3000 --threads 1 --settings '{"hidden": [256, 256], "batch_size": 64}'

and it prints one JSON line: {"updates_per_second": ...}. Only `fit` is timed (no evaluation, no logging).
"""

import argparse
import json
import sys
import time
from pathlib import Path
from typing import NoReturn, Optional

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
    parser.add_argument(
        "--algo", required=True, choices=["DiscreteCQL", "DiscreteBCQ", "BCQ", "CQL", "TD3PlusBC", "IQL", "BC"]
    )
    parser.add_argument("--dataset", required=True, help="a .npz of data_collection/collect_dataset.py")
    parser.add_argument("--steps", type=int, default=1000, help="gradient steps to time")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--settings", default="{}", help="JSON: hidden, batch_size and the algorithm's sizes")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    for flag, minimum in (("steps", 1), ("threads", 1), ("seed", 0)):
        if getattr(args, flag) < minimum:
            fail(f"--{flag} must be at least {minimum}, got {getattr(args, flag)}")
    try:
        args.settings = json.loads(args.settings)
    except ValueError as error:
        fail(f"--settings is not JSON: {error}")
    if not isinstance(args.settings, dict):
        fail(f"--settings must be a JSON object, got {json.dumps(args.settings)}")
    return args


def read_dataset(path: str) -> dict[str, np.ndarray]:
    """The arrays of a dataset file, or one line that says what is wrong with it (this file imports nothing from the
    repository, so not data_collection/dataset_io.py's checks)."""
    keys = ("observations", "actions", "rewards", "terminations", "truncations")
    if Path(path).is_dir():
        fail(f"{path} is a folder, not a dataset file (.npz)")
    if not Path(path).is_file():
        fail(f"dataset {path} does not exist; build it with {COLLECTOR}")
    try:
        with np.load(path, allow_pickle=False) as file:
            arrays = {key: file[key] for key in keys}
    except Exception as error:  # numpy, zipfile and zlib each raise their own kind for a damaged file
        fail(f"cannot read {path} ({type(error).__name__}: {error}); collect it again ({COLLECTOR})")
    if any(array.dtype.kind not in "fiub" for array in arrays.values()):
        fail(f"{path}: its arrays are not all numbers; collect it again ({COLLECTOR})")
    return arrays


def main() -> None:
    import d3rlpy
    import torch

    args = parse_args()
    settings = args.settings
    file = read_dataset(args.dataset)
    torch.set_num_threads(args.threads)
    d3rlpy.seed(args.seed)
    discrete = file["actions"].ndim == 1
    dataset = d3rlpy.dataset.MDPDataset(
        file["observations"],
        file["actions"].reshape(len(file["actions"]), -1),
        file["rewards"],
        file["terminations"],
        timeouts=file["truncations"] & ~file["terminations"],  # d3rlpy refuses a step both; it terminated
        action_space=d3rlpy.constants.ActionSpace.DISCRETE if discrete else d3rlpy.constants.ActionSpace.CONTINUOUS,
        action_size=int(file["actions"].max()) + 1 if discrete else None,
    )

    def encoder(hidden: list[int]) -> d3rlpy.models.VectorEncoderFactory:
        return d3rlpy.models.VectorEncoderFactory(hidden_units=hidden)

    if args.algo == "DiscreteCQL":
        config = d3rlpy.algos.DiscreteCQLConfig(
            batch_size=settings["batch_size"],
            encoder_factory=encoder(settings["hidden"]),
            learning_rate=settings["learning_rate"],
            alpha=settings["cql_alpha"],
            target_update_interval=settings["target_update_interval"],
        )
    elif args.algo == "DiscreteBCQ":
        config = d3rlpy.algos.DiscreteBCQConfig(
            batch_size=settings["batch_size"],
            encoder_factory=encoder(settings["hidden"]),
            learning_rate=settings["learning_rate"],
            action_flexibility=settings["threshold"],
            target_update_interval=settings["target_update_interval"],
            share_encoder=settings["shared_trunk"],
        )
    elif args.algo == "BCQ":
        # n_action_samples is used both in the target and when acting; only the target matters while training.
        config = d3rlpy.algos.BCQConfig(
            batch_size=settings["batch_size"],
            actor_encoder_factory=encoder(settings["actor_hidden"]),
            critic_encoder_factory=encoder(settings["critic_hidden"]),
            imitator_encoder_factory=encoder(settings["vae_hidden"]),
            n_action_samples=settings["target_samples"],
            lam=settings["lmbda"],
            action_flexibility=settings["phi"],
        )
    elif args.algo == "TD3PlusBC":
        config = d3rlpy.algos.TD3PlusBCConfig(
            batch_size=settings["batch_size"],
            actor_encoder_factory=encoder(settings["hidden"]),
            critic_encoder_factory=encoder(settings["hidden"]),
            alpha=settings["alpha"],
            target_smoothing_sigma=settings["policy_noise"],
            target_smoothing_clip=settings["noise_clip"],
            update_actor_interval=settings["policy_freq"],
        )
    elif args.algo == "BC":
        # "deterministic": a tanh policy fitted by the squared error, as bc.py's default --box-loss mse.
        config = d3rlpy.algos.BCConfig(
            batch_size=settings["batch_size"],
            encoder_factory=encoder(settings["hidden"]),
            learning_rate=settings["learning_rate"],
            policy_type="deterministic",
        )
    elif args.algo == "IQL":
        config = d3rlpy.algos.IQLConfig(
            batch_size=settings["batch_size"],
            actor_encoder_factory=encoder(settings["hidden"]),
            critic_encoder_factory=encoder(settings["hidden"]),
            value_encoder_factory=encoder(settings["hidden"]),
            expectile=settings["expectile"],
            weight_temp=settings["beta"],
            max_weight=settings["max_weight"],
        )
    else:
        config = d3rlpy.algos.CQLConfig(
            batch_size=settings["batch_size"],
            actor_encoder_factory=encoder(settings["hidden"]),
            critic_encoder_factory=encoder(settings["hidden"]),
            n_action_samples=settings["num_random"],
            conservative_weight=settings["cql_alpha"],
            alpha_threshold=settings["target_action_gap"],
            alpha_learning_rate=settings["alpha_lr"] if settings["lagrange"] else 0.0,
        )

    algo = config.create(device="cpu:0")
    algo.build_with_dataset(dataset)
    fit = dict(
        n_steps_per_epoch=args.steps,
        show_progress=False,
        save_interval=10**9,
        logger_adapter=d3rlpy.logging.NoopAdapterFactory(),
    )
    algo.fit(dataset, n_steps=min(20, args.steps), **{**fit, "n_steps_per_epoch": min(20, args.steps)})  # warm-up
    start = time.perf_counter()
    algo.fit(dataset, n_steps=args.steps, **fit)
    print(json.dumps({"updates_per_second": args.steps / (time.perf_counter() - start)}))


if __name__ == "__main__":
    main()
