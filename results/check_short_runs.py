"""Does a change to algorithms/ keep the numbers? Seeded short runs of each script, at a commit and in the working tree.

    .venv/bin/python results/check_short_runs.py --commit 6109fc1
    .venv/bin/python results/check_short_runs.py --commit HEAD --scripts td3_bc iql

Each script runs twice, as it was at --commit and as it is in the working tree, with the same flags
(--seed 1 --total-steps 300 --eval-freq 150 --eval-episodes 2), on small datasets built here by the collector's own
code: Pendulum-v1 (Box actions) for the Box scripts, CartPole-v1 (Discrete) for the discrete ones, and both for the
scripts that take both; then once more with the flags of VARIANTS, which reach what the defaults do not in 300
steps (CQL-SAC's Q-learning after its warm start, the discrete scripts' target updates, ...). The check passes when
every evaluation holds the same numbers (returns, normalised scores, Q(s0) estimates, discounted returns; a field
added since is not a change, the wall time is not compared) and every tensor of the saved model is equal, bit for
bit. It prints one line per run, and exits 1 on a difference. The short run and the comparison are those of
results/check_reuse.py, which checks the records of the matrix the same way.
"""

import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "data_collection"))
sys.path.insert(0, str(ROOT / "results"))
from check_reuse import same_evaluations, short_run  # noqa: E402
from collect_dataset import collect, run_episodes, uniform_actions  # noqa: E402
from dataset_io import describe_space, parse_flags, save_dataset  # noqa: E402

SCRIPTS = {
    "bc": ("Pendulum-v1", "CartPole-v1"),
    "bcq_continuous": ("Pendulum-v1",),
    "bcq_discrete": ("CartPole-v1",),
    "cql_discrete_lunarlander": ("CartPole-v1",),
    "cql_sac_continuous": ("Pendulum-v1",),
    "iql": ("Pendulum-v1", "CartPole-v1"),
    "td3_bc": ("Pendulum-v1",),
}


# More flags per script, for the paths the short run does not reach with the defaults (the warm start of CQL-SAC
# lasts 3000 steps; the discrete scripts' hard target updates come every 1000).
VARIANTS = {
    "bc": [("Pendulum-v1", ["--box-loss", "gaussian"])],
    "cql_discrete_lunarlander": [("CartPole-v1", ["--target-network-frequency", "70", "--double-dqn"])],
    "bcq_discrete": [("CartPole-v1", ["--target-network-frequency", "70", "--tau", "1.0"])],
    "cql_sac_continuous": [
        ("Pendulum-v1", ["--bc-steps", "100"]),
        ("Pendulum-v1", ["--bc-steps", "100", "--lagrange"]),
    ],
    "td3_bc": [("Pendulum-v1", ["--layer-norm", "--policy-freq", "3"])],
}


@dataclass
class Args:
    commit: str = "HEAD"
    """the commit whose scripts give the numbers to match"""
    scripts: list[str] = field(default_factory=lambda: list(SCRIPTS))
    """the scripts of algorithms/ to check, by name"""


def controller(env_id: str, observations: np.ndarray) -> np.ndarray:
    """A linear balancing controller for CartPole; a swing-up and PD balance for Pendulum."""
    if env_id == "CartPole-v1":
        x, x_dot, theta, theta_dot = observations.T
        return (theta + 0.5 * theta_dot + 0.05 * x + 0.1 * x_dot > 0).astype(np.int64)
    cos, sin, theta_dot = observations.T
    energy = 0.5 * theta_dot**2 + 10.0 * (cos - 1.0)
    pump = np.where(energy < 0, 2.0 * np.sign(theta_dot), -0.5 * theta_dot)
    pump = np.where(np.abs(theta_dot) < 1e-3, 2.0, pump)
    balance = -10.0 * np.arctan2(sin, cos) - 2.0 * theta_dot
    return np.clip(np.where(cos > 0.85, balance, pump), -2.0, 2.0)[:, None].astype(np.float32)


def build_dataset(folder: Path, env_id: str) -> Path:
    """3000 transitions of the controller taking a uniform random action a third of the time, seed 0."""
    env, rng = gym.make(env_id), np.random.default_rng(0)

    def act(observations: np.ndarray) -> np.ndarray:
        actions = controller(env_id, observations)
        random_actions = uniform_actions(env.action_space, rng, len(observations))
        take_random = (rng.random(len(observations)) < 1 / 3).reshape(-1, *([1] * (actions.ndim - 1)))
        return np.where(take_random, random_actions, actions)

    arrays = collect(env_id, act, 3000, num_envs=4, seed=0)
    seeds = [10_000 + i for i in range(3)]
    references = {
        "random": float(run_episodes(env_id, lambda o: uniform_actions(env.action_space, rng, len(o)), seeds).mean()),
        "expert": float(run_episodes(env_id, lambda o: controller(env_id, o), seeds).mean()),
    }
    metadata = {
        "env_id": env_id,
        "policy": "scripted",
        "agent": None,
        "noise": {"random_action_prob": 1 / 3},
        "seed": 0,
        "num_transitions": 3000,
        "gymnasium_version": gym.__version__,
        "created_by": "results/check_short_runs.py",
        "observation_space": describe_space(env.observation_space),
        "action_space": describe_space(env.action_space),
        "reference_returns": references,
    }
    path = folder / env_id / "scripted.npz"
    path.parent.mkdir(parents=True)
    save_dataset(path, arrays, metadata, overwrite=True)
    return path


def compare(before: tuple[list, dict], after: tuple[list, dict]) -> str:
    """'' when the two runs computed the same numbers, else what differs."""
    if not same_evaluations(before[0], after[0]):
        return "the evaluations differ"
    old_model, new_model = before[1], after[1]
    if old_model.keys() != new_model.keys():
        return f"the model's tensors differ in name: {sorted(set(old_model) ^ set(new_model))}"
    unequal = [name for name in old_model if not torch.equal(old_model[name], new_model[name])]
    return f"model tensors differ: {', '.join(unequal)}" if unequal else ""


def main(args: Args) -> None:
    unknown = sorted(set(args.scripts) - set(SCRIPTS))
    if unknown:
        print(
            f"error: no script {', '.join(unknown)} in algorithms/; choose among {', '.join(SCRIPTS)}", file=sys.stderr
        )
        sys.exit(2)
    failures = 0
    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(temporary)
        datasets = {env_id: build_dataset(folder / "data", env_id) for env_id in ("Pendulum-v1", "CartPole-v1")}
        for name in args.scripts:
            old = folder / "old" / f"{name}.py"
            old.parent.mkdir(exist_ok=True)
            shown = subprocess.run(
                ["git", "show", f"{args.commit}:algorithms/{name}.py"], cwd=ROOT, capture_output=True, text=True
            )
            if shown.returncode != 0:
                print(f"error: {shown.stderr.strip()}", file=sys.stderr)
                sys.exit(2)
            old.write_text(shown.stdout)
            for case, (env_id, flags) in enumerate([(env_id, []) for env_id in SCRIPTS[name]] + VARIANTS.get(name, [])):
                runs, what = folder / "runs" / name / str(case), " ".join([name, *flags, "on", env_id])
                command = ["python", f"algorithms/{name}.py", "--dataset", str(datasets[env_id]), "--seed", "1", *flags]
                try:
                    before = short_run(old, command, runs / "old")
                    after = short_run(ROOT / "algorithms" / f"{name}.py", command, runs / "new")
                except RuntimeError as error:
                    print(f"{what}: a run failed: {error}", flush=True)
                    failures += 1
                    continue
                difference = compare(before, after)
                failures += bool(difference)
                returns = ", ".join(f"{evaluation['mean_return']:.3f}" for evaluation in after[0])
                same = f"same numbers as {args.commit} (mean returns {returns}; {len(after[1])} model tensors)"
                print(f"{what}: {difference or same}", flush=True)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main(parse_flags(Args, __doc__))
