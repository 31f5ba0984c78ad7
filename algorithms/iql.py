"""Implicit Q-Learning, offline: Kostrikov, Nair and Levine, 2022, "Offline Reinforcement Learning with Implicit
Q-Learning", https://arxiv.org/abs/2110.06169.

Offline methods go wrong where they query Q at actions the data never took (a max over actions, an actor that
climbs the critic): nothing corrects Q there. IQL never asks; its three losses use only the data's (s, a, r, s'):

    value:   L_V = E[ L2_tau(min(Q1', Q2')(s, a) - V(s)) ],  L2_tau(u) = |tau - 1(u < 0)| * u^2        (eq. 5)
    critic:  L_Q = E[ (r + gamma * (1 - terminal) * V(s') - Q_i(s, a))^2 ]  for Q1 and Q2                   (eq. 6)
    actor:   L_pi = -E[ min(exp(beta * (min(Q1', Q2')(s, a) - V(s))), 100) * log pi(a|s) ]                  (eq. 7)

The expectile tau 0.7 > 0.5 makes V(s) a soft maximum of Q over the actions the data supports at s, so the target
r + gamma * V(s') approximates the best in-data action's value without evaluating any other action (section 4).
The actor is advantage-weighted behaviour cloning (beta 3). Q' are Polyak-averaged target critics.

    python algorithms/iql.py --dataset datasets/Hopper-v5/medium-expert.npz
    python algorithms/iql.py --dataset datasets/LunarLander-v3/noisy.npz

Both action kinds, chosen by the dataset: Box actions in the normalised box [-1, 1]^d (mapped to the env's bounds
when acting), or Discrete ones (the Actor and TwinCritic say how). Defaults are those of the paper's code for
locomotion, ikostrikov/implicit_q_learning, except where a field says otherwise. The algorithm ends at the line
"run bookkeeping"; what follows it is the same in every script of algorithms/.
"""

import signal

signal.signal(signal.SIGINT, signal.SIG_DFL)  # Ctrl-C while the libraries load stops quietly; Run() takes over

import contextlib
import copy
import io
import json
import math
import os
import platform
import random
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable, NoReturn, Optional

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from torch.utils.tensorboard import SummaryWriter

ACTION_KIND = "both"  # the action spaces this script learns: "discrete", "box" or "both"
DATASET_KEYS = ("observations", "actions", "rewards", "next_observations", "terminations")


@dataclass
class AlgorithmArgs:
    dataset: str = "datasets/Hopper-v5/medium-expert.npz"
    """dataset file (.npz) made by data_collection/collect_dataset.py"""
    total_steps: int = 200_000
    """number of gradient steps (paper: 1M; 200k here: 38 minutes on one CPU core, and still rising at 100k)"""
    eval_freq: int = 10_000
    """evaluate every this many gradient steps (and after the last one)"""
    save_model: bool = True
    """save actor, critic and value (one nn.ModuleDict's state_dict) to <run folder>/<exp_name>.pt, and policy.pt2"""
    learning_rate: float = 3e-4
    """Adam learning rate of the actor, the critics and the value network; the actor's decays to 0 by a cosine"""
    batch_size: int = 256
    """transitions per gradient step"""
    hidden_dim: int = 256
    """width of the two hidden layers of the actor, each critic and the value network"""
    gamma: float = 0.99
    """discount factor"""
    tau: float = 0.005
    """Polyak averaging rate of the target critics, applied after every gradient step"""
    expectile: float = 0.7
    """the expectile of Q that V learns (eq. 5): 0.5 is the mean (SARSA), towards 1 the max over data actions"""
    beta: float = 3.0
    """inverse temperature of the advantage weights (eq. 7): 0 is behaviour cloning"""
    max_weight: float = 100.0
    """the advantage weights exp(beta * A) are clipped at this value (the paper's)"""
    normalize_rewards: bool = True
    """multiply rewards by 1000 / (max - min) of the dataset's episode returns (the paper's, for locomotion)"""
    normalize_observations: bool = True
    """standardise observations with the dataset's mean and std, kept in the saved model (paper: raw; here as
    td3_bc.py does, at no cost per update: the dataset is standardised once)"""


def check_flags(args: "Args") -> None:
    """Refuse this algorithm's flags where they cannot make a run (the run bookkeeping checks the others)."""
    for name in ("batch_size", "hidden_dim"):
        if getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if not 0.0 < args.learning_rate < math.inf:
        fail(f"--learning-rate must be a positive finite number, got {args.learning_rate}")
    if not 0.0 <= args.gamma <= 1.0:
        fail(f"--gamma must be in [0, 1], got {args.gamma}")
    if not 0.0 < args.tau <= 1.0:
        fail(f"--tau must be in (0, 1], got {args.tau}")
    if not 0.0 < args.expectile < 1.0:
        fail(f"--expectile must be in (0, 1), got {args.expectile}")
    if not 0.0 <= args.beta < math.inf:  # 0 is behaviour cloning
        fail(f"--beta must be a finite number at least 0, got {args.beta}")
    if not 0.0 < args.max_weight < math.inf:
        fail(f"--max-weight must be a positive finite number, got {args.max_weight}")


# ------------------------------------------------------------------------------------------------- networks
def mlp(input_dim: int, output_dim: int, hidden_dim: int) -> nn.Sequential:
    layers = [nn.Linear(input_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, hidden_dim), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(hidden_dim, output_dim))


class TwinCritic(nn.Module):
    """Q1 and Q2 of given actions: MLPs of (s, a) (Box), or of s with one Q per action (Discrete, n_actions > 0)."""

    def __init__(self, obs_dim: int, action_dim: int, n_actions: int, hidden_dim: int):
        super().__init__()
        self.discrete = n_actions > 0
        input_dim, output_dim = (obs_dim, n_actions) if self.discrete else (obs_dim + action_dim, 1)
        self.q1, self.q2 = mlp(input_dim, output_dim, hidden_dim), mlp(input_dim, output_dim, hidden_dim)

    def forward(self, observations: torch.Tensor, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.discrete:
            return tuple(q(observations).gather(-1, actions.unsqueeze(-1)).squeeze(-1) for q in (self.q1, self.q2))
        inputs = torch.cat([observations, actions], dim=-1)
        return self.q1(inputs).squeeze(-1), self.q2(inputs).squeeze(-1)


class Actor(nn.Module):
    """pi(a|s): a Gaussian, mean tanh(network(s)), state-independent std (Box), or a softmax (Discrete), on
    observations standardised with the dataset's mean and std (buffers, so that the saved actor carries them)."""

    def __init__(self, obs_dim: int, action_dim: int, n_actions: int, hidden_dim: int):
        super().__init__()
        self.discrete = n_actions > 0
        self.network = mlp(obs_dim, n_actions if self.discrete else action_dim, hidden_dim)
        self.log_std = nn.Parameter(torch.zeros(0 if self.discrete else action_dim))
        self.register_buffer("obs_mean", torch.zeros(obs_dim))
        self.register_buffer("obs_std", torch.ones(obs_dim))

    def normalize(self, observations: torch.Tensor) -> torch.Tensor:
        return (observations - self.obs_mean) / self.obs_std

    def log_prob(self, observations: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """log pi(a|s) of the data's actions (in [-1, 1] for Box) at standardised observations."""
        output = self.network(observations)
        if self.discrete:
            return -F.cross_entropy(output, actions, reduction="none")
        std = self.log_std.clamp(-5.0, 2.0).exp()
        return torch.distributions.Normal(torch.tanh(output), std, validate_args=False).log_prob(actions).sum(-1)

    def deterministic(self, observations: torch.Tensor) -> torch.Tensor:
        """The action the actor takes at standardised observations: argmax, or the mean in [-1, 1]."""
        return self.network(observations).argmax(dim=-1) if self.discrete else torch.tanh(self.network(observations))


class ActingPolicy(nn.Module):
    """The acting function that evaluation plays and policy.pt2 holds: raw env observations in, env actions out
    (Box actions mapped from [-1, 1] to [low, high]; low and high are empty for Discrete actions)."""

    def __init__(self, actor: Actor, low: torch.Tensor, high: torch.Tensor):
        super().__init__()
        self.actor = actor
        self.register_buffer("low", low)
        self.register_buffer("high", high)

    def forward(self, observations: torch.Tensor) -> torch.Tensor:
        actions = self.actor.deterministic(self.actor.normalize(observations))
        return actions if self.actor.discrete else unnormalize_actions(actions, self.low, self.high)


def q_initial(actor: Actor, critic: TwinCritic, observations: torch.Tensor, reward_scale: float) -> torch.Tensor:
    """min(Q1, Q2)(s, pi(s)) at raw observations, in the env's reward units: the estimate that evaluation compares
    with the discounted return. The critic takes standardised observations and Box actions in [-1, 1]^d."""
    normalized = actor.normalize(observations)
    return torch.minimum(*critic(normalized, actor.deterministic(normalized))) / reward_scale


# ------------------------------------------------------------------------------------------------- the maths
def expectile_loss(differences: torch.Tensor, expectile: float) -> torch.Tensor:
    """L2_tau(u) = |tau - 1(u < 0)| * u^2 averaged over the batch, u = Q(s, a) - V(s): the paper's eq. 5."""
    weight = torch.where(differences < 0, 1.0 - expectile, expectile)
    return (weight * differences.pow(2)).mean()


def advantage_weights(advantages: torch.Tensor, beta: float, max_weight: float) -> torch.Tensor:
    """exp(beta * (Q - V)) clipped at max_weight: eq. 7's weight on log pi(a|s)."""
    return torch.exp(beta * advantages).clamp(max=max_weight)


def iql_target(rewards: torch.Tensor, terminations: torch.Tensor, next_v: torch.Tensor, gamma: float) -> torch.Tensor:
    """r + gamma * (1 - terminal) * V(s'): eq. 6's target, which needs no action at s'."""
    return rewards + gamma * (1.0 - terminations) * next_v


def reward_scale_of(episode_returns: np.ndarray, normalize_rewards: bool) -> float:
    """1000 / (max - min) of the dataset's episode returns (the paper's, for locomotion); 1 without two of them,
    when they are all equal, or with --no-normalize-rewards."""
    return_range = float(np.ptp(episode_returns)) if normalize_rewards and len(episode_returns) > 1 else 0.0
    return 1000.0 / return_range if return_range > 0 else 1.0


# ------------------------------------------------------------------------------------------------- one update
def update(
    step: int,
    batch: dict[str, torch.Tensor],
    actor: Actor,
    critic: TwinCritic,
    target_critic: TwinCritic,
    value: nn.Sequential,
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    args: AlgorithmArgs,
    reward_scale: float,
) -> dict[str, torch.Tensor]:
    """One gradient step of the value network, the actor and the critics together, then of the target critics. The
    batch's observations are standardised, its rewards scaled by reward_scale, its Box actions in [-1, 1]. Returns
    the scalars to log, as tensors; q_data in the env's reward units."""
    observations, actions = batch["observations"], batch["actions"]
    # Value (eq. 5): V(s) regresses on the target critics' Q of the data's action, towards its upper expectile.
    with torch.no_grad():
        target_q = torch.minimum(*target_critic(observations, actions))
        next_values = value(batch["next_observations"]).squeeze(-1)
    advantages = target_q - value(observations).squeeze(-1)
    value_loss = expectile_loss(advantages, args.expectile)
    # Actor (eq. 7): advantage-weighted log-likelihood of the data's actions.
    weights = advantage_weights(advantages.detach(), args.beta, args.max_weight)
    actor_loss = -(weights * actor.log_prob(observations, actions)).mean()
    # Critics (eq. 6): both regress on r + gamma * V(s').
    targets = iql_target(batch["rewards"], batch["terminations"], next_values, args.gamma)
    q1, q2 = critic(observations, actions)
    critic_loss = F.mse_loss(q1, targets) + F.mse_loss(q2, targets)
    # The three losses touch disjoint parameters (targets and advantages are detached), so one backward pass and one
    # Adam step over their sum update all three from the same parameters, at less cost; the authors' code updates V
    # first and uses the new V in the other two losses.
    optimizer.zero_grad()
    (value_loss + actor_loss + critic_loss).backward()
    optimizer.step()
    schedule.step()
    with torch.no_grad():  # one fused lerp over all parameters: target <- target + tau * (online - target)
        torch._foreach_lerp_(list(target_critic.parameters()), list(critic.parameters()), args.tau)
    losses = {"value_loss": value_loss, "actor_loss": actor_loss, "critic_loss": critic_loss}
    scalars = {f"losses/{name}": loss.detach() for name, loss in losses.items()}
    return {**scalars, "diagnostics/q_data": q1.detach().mean() / reward_scale, "diagnostics/weight": weights.mean()}


# ---- run bookkeeping: the same in every script of algorithms/ ----
# Flags, dataset and env checks, run folder, checkpoints and resume, evaluation, TensorBoard, summary.json, the
# policy file. It reads the algorithm's AlgorithmArgs, ACTION_KIND, DATASET_KEYS and check_flags() above.
OTHER_SCRIPTS = {
    "box": "cql_discrete_lunarlander.py, bcq_discrete.py, iql.py or bc.py in algorithms/",
    "discrete": "cql_sac_continuous.py, bcq_continuous.py, td3_bc.py, iql.py or bc.py in algorithms/",
}


@dataclass
class Args(AlgorithmArgs):
    exp_name: str = Path(__file__).stem
    """name of this experiment, used in the run folder's name"""
    seed: int = 1
    """seed of python, numpy and torch; evaluation episode i uses env seed seed * 1000 + i"""
    torch_deterministic: bool = True
    """set torch.backends.cudnn.deterministic"""
    cuda: bool = True
    """use CUDA when it is available"""
    track: bool = False
    """log to Weights and Biases (needs `pip install wandb`)"""
    wandb_project_name: str = "offline-rl"
    """the wandb project"""
    wandb_entity: Optional[str] = None
    """the wandb entity (team)"""
    capture_video: bool = False
    """record the first evaluation episode of each evaluation to <run folder>/videos"""
    env_id: Optional[str] = None
    """env to evaluate on; None: the dataset's env_id"""
    eval_episodes: int = 10
    """episodes per evaluation, run together in a vector env"""
    threads: int = 1
    """torch CPU threads: 1 is fastest for these small networks and lets parallel runs share the cores"""
    resume: Optional[str] = None
    """run folder to continue from its last checkpoint, with the flags it was started with"""
    clip_actions: bool = False
    """clip dataset actions outside the env's bounds into them, instead of refusing the dataset (Box actions)"""
    log_freq: int = 100
    """gradient steps between loss logs"""


def fail(message: str) -> NoReturn:
    """Stop with one line on stderr and exit status 2, without a traceback; a run folder this process made is removed
    while it holds no checkpoint, so that what is left is nothing or a folder that --resume continues."""
    print(f"error: {message}", file=sys.stderr)
    discard_new_run_dir()
    sys.exit(2)


def read_flags(argv: Optional[list[str]] = None) -> tuple[Args, Optional[dict]]:
    """The checked flags (with --resume: those of the run, and its checkpoint). tyro's error box becomes one line."""
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            args = tyro.cli(Args, args=argv, description=__doc__)
    except SystemExit as stop:
        if stop.code:
            lines = [line.strip("│╭╮╰╯─ ") for line in captured.getvalue().splitlines()] + [""]
            message = " ".join(lines[1 : lines.index("", 1)]).rstrip(".") or "the flags could not be read"
            for python_words, kind in (
                ("invalid literal for int() with base 10", "a whole number"),
                ("could not convert string to float", "a number"),
            ):
                message = message.replace(f": {python_words}: ", f" takes {kind}, got ").replace("Error parsing ", "")
            fail(f"{message}; see --help")
        raise
    args, checkpoint = load_checkpoint(args) if args.resume else (args, None)
    validate_args(args)
    return args, checkpoint


def validate_args(args: Args) -> None:
    """Refuse flags that cannot make a run, before anything is written."""
    for name in ("total_steps", "eval_freq", "eval_episodes", "threads", "log_freq"):
        if getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.seed < 0:
        fail(f"--seed must be a finite number at least 0, got {args.seed}")
    if ACTION_KIND == "discrete" and args.clip_actions:
        fail("--clip-actions applies to Box actions; this script takes discrete actions only: drop it")
    check_flags(args)


def load_dataset(path: str, device: torch.device) -> tuple[dict[str, torch.Tensor], dict]:
    """DATASET_KEYS as tensors on the device (a batch is one torch.randint and an index), and the metadata with the
    file's episode_returns (optional). Whatever is wrong with the file stops the run here, in one line."""
    if Path(path).is_dir():
        names = sorted(file.name for file in Path(path).glob("*.npz"))
        inside = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "") if names else "no .npz file"
        fail(f"{path} is a folder; --dataset takes a dataset file (.npz). The folder holds: {inside}")
    if not Path(path).is_file():
        env_id, policy = Path(path).parent.name or "<env id>", Path(path).stem
        how = f"python data_collection/collect_dataset.py --env-id {env_id} --policy {policy} --output {path}"
        how = how if policy in ("expert", "noisy", "sampled", "random") else "the commands in results/README.md"
        fail(f"dataset {path} does not exist. Build it with:  {how}")
    try:
        with np.load(path, allow_pickle=False) as file:
            arrays = {key: file[key] for key in file.files}
        metadata = json.loads(str(arrays.pop("metadata")))
    except Exception as error:  # numpy, zipfile, zlib and json each raise their own kind for a damaged file
        reasons = {"Object arrays": "an array holds Python objects", "pickled": "it is not a .npz file"}
        reason = next((why for text, why in reasons.items() if text in str(error)), f"{type(error).__name__}: {error}")
        reason = "it has no metadata" if isinstance(error, KeyError) else reason
        fail(f"cannot read {path}: {reason}. Make datasets with data_collection/collect_dataset.py")
    missing = ", ".join(key for key in DATASET_KEYS if key not in arrays)
    if missing or not isinstance(metadata, dict):
        why = f"it lacks {missing}" if missing else "its metadata is not a JSON object"
        fail(f"{path} is not a dataset of data_collection/collect_dataset.py: {why}")
    actions = arrays["actions"]
    kind = {(1, "i"): "discrete", (1, "u"): "discrete", (2, "f"): "box"}.get((actions.ndim, actions.dtype.kind))
    names, shape = {"discrete": "discrete", "box": "continuous (Box)"}, actions.shape
    if kind is None:
        fail(f"{path}: actions are {actions.dtype} {shape}; expected integers [N] (Discrete) or floats [N, d] (Box)")
    if ACTION_KIND not in (kind, "both"):
        what = "discrete actions" if kind == "discrete" else f"continuous (Box) actions of shape {actions.shape[1:]}"
        fail(f"{path} has {what}; this script needs {names[ACTION_KIND]} actions: use {OTHER_SCRIPTS[ACTION_KIND]}")
    n, obs_dim = arrays["observations"].shape if arrays["observations"].ndim == 2 else (0, 0)
    expected = {"observations": (n, obs_dim), "next_observations": (n, obs_dim), "actions": (n, *actions.shape[1:])}
    shapes = {key: arrays[key].shape for key in DATASET_KEYS}
    if n == 0 or any(shapes[key] != expected.get(key, (n,)) for key in DATASET_KEYS):
        fail(
            f"{path}: the arrays' shapes {shapes} are not observations and next_observations [N, obs_dim], actions "
            "[N] or [N, action_dim], rewards and terminations [N], with N at least 1"
        )
    if n < 2:
        fail(f"{path} holds 1 transition; a script needs at least 2 (the observations' mean and spread need two)")
    if problem := metadata_problem(metadata):
        fail(f"{path}: {problem}. Make datasets with data_collection/collect_dataset.py")
    metadata["episode_returns"] = arrays.get("episode_returns", np.zeros(0))
    for key, values in [
        *((key, arrays[key]) for key in DATASET_KEYS),
        ("episode_returns", metadata["episode_returns"]),
    ]:
        if values.dtype.kind not in "fiub":  # terminations are booleans
            fail(f"{path}: {key} have dtype {values.dtype}, not numbers")
        if not np.isfinite(values).all():
            fail(
                f"{path}: {key} hold {np.count_nonzero(~np.isfinite(values))} NaN or infinite values; drop those "
                "transitions or collect the dataset again"
            )
    # Only true terminations stop bootstrapping; a time-limit truncation still bootstraps.
    data = {key: torch.tensor(arrays[key], dtype=torch.float32, device=device) for key in DATASET_KEYS}
    data["actions"] = torch.tensor(actions, dtype=torch.long if kind == "discrete" else torch.float32, device=device)
    return data, metadata


def metadata_problem(metadata: dict) -> Optional[str]:
    """What in the metadata fields the scripts read is of the wrong kind, or None."""
    number = lambda value: isinstance(value, (int, float)) and not isinstance(value, bool)  # noqa: E731
    env_id, references, space = (metadata.get(key) for key in ("env_id", "reference_returns", "action_space"))
    if env_id is not None and not (isinstance(env_id, str) and env_id):
        return f"its env_id is {env_id!r}, not the name of an env"
    if references is not None:
        values = [references.get(key) for key in ("random", "expert")] if isinstance(references, dict) else [""]
        if not all(value is None or (number(value) and math.isfinite(value)) for value in values):
            return f"its reference_returns are {references!r}, not {{'random': number, 'expert': number}}"
    if space is not None and not isinstance(space, dict):
        return f"its action_space is {space!r}, not a JSON object"
    if space and space.get("n") is not None and not (isinstance(space["n"], int) and space["n"] >= 1):
        return f"its action_space has n = {space['n']!r}, not a number of actions"
    for key in ("low", "high"):
        if (
            space
            and space.get(key) is not None
            and not (isinstance(space[key], list) and all(number(value) for value in space[key]))
        ):
            return f"its action_space's {key} is {space[key]!r}, not a list of numbers"
    return None


def validate_env(args: Args, data: dict[str, torch.Tensor], metadata: dict) -> tuple[str, gym.spaces.Space]:
    """The env to evaluate on and its action space, once the dataset is known to fit it; else one line and exit 2."""
    env_id = args.env_id or metadata.get("env_id") or fail(f"{args.dataset} does not name its env; give --env-id")
    if args.capture_video:
        prepare_rendering(env_id)
    try:
        quiet_mujoco_deprecations(env_id)
        with gym.make(env_id) as probe_env:
            space, observation_shape = probe_env.action_space, probe_env.observation_space.shape
    except gym.error.Error as error:
        fail(f"cannot make env {env_id!r}: {error}")
    actions, obs_dim, discrete = data["actions"], data["observations"].shape[1], data["actions"].dtype == torch.long
    if not isinstance(space, gym.spaces.Discrete if discrete else gym.spaces.Box):
        kind = "discrete actions" if discrete else f"continuous actions of shape ({actions.shape[1]},)"
        need = "a Discrete action space" if discrete else "a Box action space"
        fail(f"dataset {args.dataset} has {kind}, env {env_id} has actions {space}; this dataset needs {need}")
    described, ours = metadata.get("action_space", {}), f"dataset {args.dataset} has obs_dim {obs_dim} and"
    if discrete:
        n_actions = described.get("n", int(actions.max()) + 1)
        if observation_shape != (obs_dim,) or n_actions != int(space.n):
            fail(
                f"dataset and env do not match: {ours} {n_actions} actions, env {env_id} has observation shape "
                f"{observation_shape} and {space.n} actions"
            )
        if actions.min() < 0 or actions.max() >= n_actions:
            fail(
                f"{args.dataset}: actions range over {int(actions.min())}..{int(actions.max())}, outside the env's "
                f"0..{n_actions - 1}"
            )
        return env_id, space
    data_low, data_high = (described.get(key, getattr(space, key).tolist()) for key in ("low", "high"))
    bounds, same_shapes = f"[{space.low.tolist()}, {space.high.tolist()}]", observation_shape == (obs_dim,)
    same_shapes = same_shapes and space.shape == actions.shape[1:] == np.shape(data_low) == np.shape(data_high)
    if not (same_shapes and np.allclose(data_low, space.low) and np.allclose(data_high, space.high)):
        fail(
            f"dataset and env do not match: {ours} actions of shape ({actions.shape[1]},) in [{data_low}, "
            f"{data_high}], env {env_id} has observation shape {observation_shape} and actions of shape "
            f"{space.shape} in {bounds}"
        )
    if not (np.isfinite(space.low).all() and np.isfinite(space.high).all()):
        fail(f"{env_id} has unbounded actions {space}; this script needs a Box action space with finite bounds")
    data_min, data_max = (values.cpu().numpy() for values in actions.aminmax(dim=0))
    low, high = space.low.astype(np.float32), space.high.astype(np.float32)  # in the data's precision
    if not args.clip_actions and ((data_min < low - 1e-4).any() or (data_max > high + 1e-4).any()):
        fail(
            f"{args.dataset}: actions range over [{data_min.tolist()}, {data_max.tolist()}], outside the env's "
            f"bounds {bounds}; --clip-actions clips them"
        )
    return env_id, space


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


def normalize_actions(actions: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Env units [low, high] -> [-1, 1]."""
    return 2.0 * (actions - low) / (high - low) - 1.0


def unnormalize_actions(actions: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> env units [low, high]."""
    return low + 0.5 * (actions + 1.0) * (high - low)


def return_range(rewards: torch.Tensor, gamma: float) -> tuple[float, float]:
    """The smallest and the largest discounted return the rewards allow: the lowest (highest) reward at every step for
    ever, min (max) reward / (1 - gamma), or 0 where an episode ends at once. No script here backs up an entropy bonus
    (CQL-SAC's backup is deterministic), so the rewards alone bound what a critic may estimate."""
    low, high = min(float(rewards.min()), 0.0), max(float(rewards.max()), 0.0)
    if gamma >= 1.0:
        return -math.inf if low < 0 else 0.0, math.inf if high > 0 else 0.0
    return low / (1.0 - gamma), high / (1.0 - gamma)


def sample(data: dict[str, torch.Tensor], batch_size: int) -> dict[str, torch.Tensor]:
    """batch_size transitions drawn uniformly, with replacement: one torch.randint, then an index into each array."""
    indices = torch.randint(len(data["actions"]), (batch_size,), device=data["actions"].device)
    return {key: values[indices] for key, values in data.items()}


def evaluate(acting, q_initial, env_id, episodes, seed, gamma, device, references, video_folder=None, prefix="eval"):
    """Episodes of acting(raw observations) -> env actions, batched in a vector env. Returns the evaluation's record:
    mean_return, std_return, normalized_score (None without reference returns), q_initial (mean of q_initial(first
    observations, first actions), absent when q_initial is None), discounted_return_initial and the returns.
    Random numbers that acting draws come from torch's generator seeded with `seed` in a fork of its state, so an
    evaluation is reproducible (results/evaluate_policy.py replays it) and leaves the training's random numbers be."""

    def make_env(index: int) -> gym.Env:
        if video_folder is None or index > 0:
            return gym.make(env_id)
        video = dict(episode_trigger=lambda episode: episode == 0, name_prefix=prefix, disable_logger=True)
        return gym.wrappers.RecordVideo(gym.make(env_id, render_mode="rgb_array"), str(video_folder), **video)

    same_step = gym.vector.AutoresetMode.SAME_STEP
    envs = gym.vector.SyncVectorEnv([lambda i=i: make_env(i) for i in range(episodes)], autoreset_mode=same_step)
    observations, _ = envs.reset(seed=[seed * 1000 + i for i in range(episodes)])
    returns, discounted_returns, running = np.zeros(episodes), np.zeros(episodes), np.ones(episodes, dtype=bool)
    discount, first_q, was_training = 1.0, None, acting.training
    acting.eval()
    # Every episode is acted for at every step, the finished ones too (their envs have reset; what they return is
    # ignored), so that the random numbers drawn are those of results/evaluate_policy.py, which plays the same way.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
        torch.manual_seed(seed)
        while running.any():
            observation_tensor = torch.tensor(observations, dtype=torch.float32, device=device)
            actions = acting(observation_tensor)
            if first_q is None and q_initial is not None:
                first_q = q_initial(observation_tensor, actions).cpu().numpy()
            observations, rewards, terminations, truncations, _ = envs.step(actions.cpu().numpy())
            returns += np.where(running, rewards, 0.0)
            discounted_returns += np.where(running, discount * rewards, 0.0)
            discount *= gamma
            running &= ~(terminations | truncations)
    envs.close()
    acting.train(was_training)
    mean_return = float(returns.mean())
    record = {"mean_return": mean_return, "std_return": float(returns.std()), "normalized_score": None}
    low, high = (references or {}).get("random"), (references or {}).get("expert")
    if low is not None and high is not None and low != high:  # D4RL's: 0 a uniform random policy, 100 the expert
        record["normalized_score"] = 100.0 * (mean_return - low) / (high - low)
    if q_initial is not None:
        record["q_initial"] = float(first_q.mean())
    return {**record, "discounted_return_initial": float(discounted_returns.mean()), "returns": returns.tolist()}


def prepare_rendering(env_id: str) -> None:
    """Check that --capture-video can render env_id before anything is written. Without a screen MuJoCo needs
    MUJOCO_GL=egl or osmesa, read once when mujoco is imported, so each is tried in a child process."""
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


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Write to a temporary name, then rename: a crash or a full disk while writing leaves the previous file whole.
    A file system that refuses (no space, no permission, too large a file) stops the run in one line."""
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        write(temporary)
        os.replace(temporary, path)
    except (OSError, RuntimeError) as error:  # torch.save reports a failed write as a RuntimeError
        with contextlib.suppress(OSError):
            temporary.unlink()
        reason = getattr(error, "strerror", None) or error
        fail(
            f"cannot write {path}: {reason}. Free some space or make the folder writable; the files written before "
            "are kept, and --resume continues from the last checkpoint"
        )


def lock_run_dir(run_dir: Path) -> Optional[int]:
    """Hold an exclusive lock on the run folder while this process lives, so that a second process on the same
    folder (two --resume of it) is refused instead of writing over the first. The lock is the kernel's (flock) and
    goes with the process, a killed one too; it does not hold on Windows, nor across machines on some network file
    systems."""
    try:
        import fcntl
    except ImportError:  # Windows
        return None
    descriptor = os.open(run_dir, os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(descriptor)
        fail(f"{run_dir} is in use by another process (a run or a --resume of it); wait for it to end or stop it")
    return descriptor


def git_commit() -> Optional[str]:
    """The commit of the checkout this file lies in, with "-dirty" for uncommitted changes; None outside one."""
    here, git = Path(__file__).resolve(), dict(capture_output=True, text=True, timeout=10)
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here.parent, **git)
        status = subprocess.run(["git", "status", "--porcelain", "--", here.name], cwd=here.parent, **git)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return commit.stdout.strip() + ("-dirty" if status.stdout.strip() else "") if commit.returncode == 0 else None


def rng_states() -> dict:
    """Every generator a run draws from: Python's, NumPy's, torch's on the CPU and on each CUDA device."""
    name, keys, *rest = np.random.get_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    numpy = [name, torch.from_numpy(keys.astype(np.int64)), *rest]
    return {"python": random.getstate(), "numpy": numpy, "torch": torch.get_rng_state(), "cuda": cuda}


def set_rng_states(states: dict) -> None:
    random.setstate(states["python"])
    name, keys, *rest = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(states["torch"])
    if states.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def load_checkpoint(args: Args) -> tuple[Args, dict]:
    """The checkpoint in the --resume folder, and the flags that run was started with."""
    given = [field.name for field in fields(Args) if getattr(args, field.name) != field.default]
    given.remove("resume")
    if given:
        drop = " ".join(f"--{name.replace('_', '-')}" for name in given)
        fail(f"--resume continues a run with the flags it was started with; drop {drop}")
    path = Path(args.resume) / "checkpoint.pt"
    if not path.is_file():
        fail(f"{path} does not exist: --resume takes the run folder of a run that reached its first evaluation")
    try:
        checkpoint = torch.load(path, weights_only=True)
    except Exception as error:  # torch, pickle and zipfile each raise their own kind for a damaged file
        fail(f"cannot read {path} ({type(error).__name__}): it is damaged; start a new run, or resume another folder")
    saved = checkpoint.get("args") if isinstance(checkpoint, dict) else None
    known = {field.name for field in fields(Args)}
    if not (isinstance(saved, dict) and {"step", "state", "rng"} <= set(checkpoint) and set(saved) <= known):
        fail(f"{args.resume} is not a run of {Path(__file__).name}: resume it with the script that made it")
    saved = Args(**{**saved, "resume": args.resume})
    if checkpoint["step"] >= saved.total_steps and (Path(args.resume) / "summary.json").is_file():
        fail(f"the run in {args.resume} has finished ({checkpoint['step']} steps); there is nothing to resume")
    return saved, checkpoint


stop_requested = 0  # the signal that asked the run to stop after its current step (0: none)
new_run_dir: Optional[Path] = None  # the folder this process made, until it holds a checkpoint
STOP_SIGNALS = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}  # SIGTERM: timeout, Slurm, Ray, Docker, Colab


def stop_after_this_step(signum, frame) -> None:
    """Ctrl-C or SIGTERM: finish the update under way, so that the checkpoint holds a consistent state, then write
    the checkpoint, summary.json, the model and the policy file, in that order; a second signal stops at once."""
    global stop_requested
    stop_requested = signum
    print(f"{STOP_SIGNALS[signum]}: stopping after this step (a second one stops at once)", file=sys.stderr, flush=True)
    for other in STOP_SIGNALS:
        signal.signal(other, stop_at_once)


def discard_new_run_dir() -> bool:
    """Remove the folder this process made if it holds no checkpoint yet, and runs/ when that leaves it empty."""
    if new_run_dir is None or (new_run_dir / "checkpoint.pt").exists():
        return False
    shutil.rmtree(new_run_dir, ignore_errors=True)
    with contextlib.suppress(OSError):
        new_run_dir.parent.rmdir()
    return True


def stop_at_once(signum, frame) -> None:
    """Stop now. A folder this process made that holds no checkpoint yet is removed: nothing is left half-made."""
    if discard_new_run_dir():
        print(f"{STOP_SIGNALS[signum]}: stopped before the first checkpoint; nothing was kept", file=sys.stderr)
    else:
        print(f"{STOP_SIGNALS[signum]}: stopped without saving; the last checkpoint, if any, is kept", file=sys.stderr)
    os._exit(128 + signum)


class Run:
    """A run: Run() reads the flags (or those of the run to resume), seeds every generator and loads the checked
    dataset (Box actions mapped into [-1, 1]); begin() makes the run folder; steps() yields the gradient steps;
    end_step() logs, evaluates and checkpoints; finish() writes the model, policy.pt2 and summary.json."""

    def __init__(self):
        for signum in STOP_SIGNALS:
            signal.signal(signum, stop_at_once)
        self.args, self.checkpoint = read_flags()
        random.seed(self.args.seed)
        np.random.seed(self.args.seed)
        torch.manual_seed(self.args.seed)
        torch.backends.cudnn.deterministic = self.args.torch_deterministic
        torch.set_num_threads(self.args.threads)
        self.device = torch.device("cuda" if torch.cuda.is_available() and self.args.cuda else "cpu")
        self.data, self.metadata = load_dataset(self.args.dataset, self.device)
        self.env_id, self.action_space = validate_env(self.args, self.data, self.metadata)
        self.return_range = return_range(self.data["rewards"], self.args.gamma)
        if isinstance(self.action_space, gym.spaces.Box):
            bounds = (self.action_space.low, self.action_space.high)
            low, high = (torch.tensor(bound, dtype=torch.float32, device=self.device) for bound in bounds)
            # The clamp covers actions a hair outside the bounds (and those --clip-actions lets through).
            self.data["actions"] = normalize_actions(self.data["actions"], low, high).clamp(-1.0, 1.0)

    def begin(self, state: dict, model: nn.Module, acting: nn.Module, q_initial=None, deterministic=True, extra=None):
        """state: what a checkpoint holds besides the generators (modules, optimisers, schedules); model: what
        <exp_name>.pt holds; acting: what evaluation plays and policy.pt2 holds; q_initial(observations, actions):
        the critic's value of the first states and actions in reward units (None: no Q(s0) diagnostic);
        deterministic: whether acting draws no random numbers; extra: more summary.json fields."""
        args, checkpoint, self.checkpoint = self.args, self.checkpoint, None  # not kept in memory once restored
        self.state, self.model, self.acting, self.q_initial = state, model, acting, q_initial
        self.deterministic, self.extra = deterministic, extra or {}
        name = f"{self.env_id}__{args.exp_name}__{Path(args.dataset).stem}__{args.seed}__{int(time.time())}"
        self.run_dir = Path(args.resume) if checkpoint else self.make_run_dir(name)
        self.lock = lock_run_dir(self.run_dir)
        if args.track:
            try:
                import wandb
            except ImportError:
                fail("--track needs wandb: pip install wandb")
            config = dict(config=vars(args), name=self.run_dir.name, save_code=True, sync_tensorboard=True)
            wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, **config)
        # purge_step drops what an interrupted run logged after its checkpoint, so a resumed curve has no doubles.
        self.writer = SummaryWriter(str(self.run_dir), purge_step=checkpoint["step"] + 1 if checkpoint else None)
        table = "\n".join(f"|{key}|{value}|" for key, value in vars(args).items())
        self.writer.add_text("hyperparameters", f"|param|value|\n|-|-|\n{table}")
        saved = checkpoint or {"step": 0, "evaluations": [], "eval_time_s": 0.0, "wall_time_s": 0.0}
        self.step = self.saved_step = saved["step"]
        self.evaluations, self.eval_time = saved["evaluations"], saved["eval_time_s"]
        self.critic_diverged_at_step = saved.get("critic_diverged_at_step")
        self.wall_time = saved["wall_time_s"]
        if checkpoint:
            for name, part in state.items():
                part.load_state_dict(checkpoint["state"][name])
            set_rng_states(checkpoint["rng"])
        self.scalars, self.last_losses, self.sps = {}, {}, 0.0
        extras = "".join(
            f", {key} {value:.4g}" if isinstance(value, float) else f", {key} {value}"
            for key, value in self.extra.items()
        )
        resumed = f", resumed after step {self.step}" if checkpoint else ""
        print(
            f"{args.exp_name}: {len(self.data['actions'])} transitions from {args.dataset}{extras}, evaluating on "
            f"{self.env_id}, run folder {self.run_dir}{resumed}"
        )

    @staticmethod
    def make_run_dir(name: str) -> Path:
        """A new folder runs/<name>: mkdir is atomic, so two runs started in the same second get a folder each."""
        global new_run_dir
        try:
            Path("runs").mkdir(exist_ok=True)
            for attempt in range(1, 1000):
                run_dir = Path("runs") / (name if attempt == 1 else f"{name}-{attempt}")
                with contextlib.suppress(FileExistsError):
                    run_dir.mkdir()
                    new_run_dir = run_dir
                    return run_dir
        except OSError as error:  # runs/ is a file, or the folder is not writable
            fail(
                f"cannot make a run folder in {Path('runs').resolve()}: {error.strerror or error}; run from a "
                "folder where you may write (runs/ goes there), or remove the file named runs"
            )
        fail(f"runs/{name} and 998 suffixed folders exist already; choose another --exp-name")

    def steps(self):
        """The gradient steps still to take, from 1 or after the checkpoint's; Ctrl-C or SIGTERM ends them."""
        self.start_time, self.last_print = time.time() - self.wall_time, time.time()
        for signum in STOP_SIGNALS:
            signal.signal(signum, stop_after_this_step)
        for step in range(self.step + 1, self.args.total_steps + 1):
            if stop_requested:
                return
            self.step = step
            yield step

    def end_step(self, step: int, scalars: dict[str, torch.Tensor]) -> None:
        """After update(): log its scalars every --log-freq steps (each keeps its last value until update() returns
        it again), evaluate every --eval-freq and at the end, and checkpoint after each evaluation and on Ctrl-C."""
        self.scalars.update(scalars)
        evaluate_now = step % self.args.eval_freq == 0 or step == self.args.total_steps
        if step % self.args.log_freq == 0 or evaluate_now:
            self.log(step)
        if evaluate_now:
            self.evaluate(step)
        if evaluate_now or stop_requested:
            self.save_checkpoint(step)

    def log(self, step: int) -> None:
        # Read here, not every step: reading a value waits for it, and that costs updates per second.
        values = {tag: value.item() for tag, value in self.scalars.items()}
        losses = {tag.removeprefix("losses/"): value for tag, value in values.items() if tag.startswith("losses/")}
        if not np.isfinite(list(losses.values())).all():
            rates = [f"--{f.name.replace('_', '-')}" for f in fields(Args) if f.name.endswith(("lr", "learning_rate"))]
            fail(
                f"a loss became non-finite at gradient step {step} (checked every --log-freq steps): {losses}; last "
                f"finite losses: {self.last_losses}. Try a lower learning rate ({', '.join(rates)})."
            )
        self.last_losses = {name: round(value, 6) for name, value in losses.items()}
        self.sps = step / (time.time() - self.start_time - self.eval_time)
        for tag, value in {**values, "charts/SPS": self.sps}.items():
            self.writer.add_scalar(tag, value, step)
        if time.time() - self.last_print > 60:  # a sign of life between evaluations, about once a minute
            shown = "  ".join(f"{name} {value:.3f}" for name, value in losses.items())
            print(f"step {step}/{self.args.total_steps}  {shown}  SPS {self.sps:.1f}", flush=True)
            self.last_print = time.time()

    def evaluate(self, step: int) -> None:
        args, eval_start, references = self.args, time.time(), self.metadata.get("reference_returns")
        video_folder = self.run_dir / "videos" if args.capture_video else None
        how = (args.eval_episodes, args.seed, args.gamma, self.device, references, video_folder, f"step{step}")
        result = evaluate(self.acting, self.q_initial, self.env_id, *how)
        if not all(math.isfinite(result.get(key, 0.0)) for key in ("mean_return", "q_initial")):
            fail(
                f"the evaluation at gradient step {step} gave a return of {result['mean_return']} and Q(s0) "
                f"{result.get('q_initial')}: the networks hold NaN or infinite values. Try a lower learning rate"
            )
        self.eval_time += time.time() - eval_start
        # wall_time_s: to this score, evaluations included.
        self.evaluations.append(evaluation := {"step": step, **result, "wall_time_s": time.time() - self.start_time})
        tags = {"eval/episodic_return": "mean_return", "eval/normalized_score": "normalized_score"}
        for tag, key in {**tags, "diagnostics/q_initial": "q_initial"}.items():
            if evaluation.get(key) is not None:
                self.writer.add_scalar(tag, evaluation[key], step)
        self.writer.add_scalar("diagnostics/discounted_return_initial", evaluation["discounted_return_initial"], step)
        q = f"  Q(s0) {evaluation['q_initial']:.1f} vs" if "q_initial" in evaluation else ""
        print(
            f"step {step}/{args.total_steps}  return {evaluation['mean_return']:.1f} ± {evaluation['std_return']:.1f}"
            f"{q}  discounted return {evaluation['discounted_return_initial']:.1f}  SPS {self.sps:.0f}  eval "
            f"{time.time() - eval_start:.0f} s",
            flush=True,
        )
        self.check_divergence(step, evaluation.get("q_initial"))

    def check_divergence(self, step: int, q: Optional[float]) -> None:
        """Say once, and record, when the critic's Q(s0) leaves the returns the data's rewards allow by more than a
        tenth of that range: a critic so far out is diverging, whatever the policy's return does meanwhile."""
        (low, high), seen = self.return_range, self.critic_diverged_at_step is not None
        margin = 0.1 * (high - low)
        if q is None or seen or margin == 0.0 or low - margin <= q <= high + margin:
            return
        self.critic_diverged_at_step = step
        side, bound = ("above", high) if q > high else ("below", low)
        print(
            f"warning: at step {step} the critic's estimate of the first states, {q:.3g}, is {side} any return the "
            f'data\'s rewards allow ({bound:,.0f}): the critic is diverging; see "Reading the Q(s0) diagnostic" in '
            "README.md",
            flush=True,
        )

    def save_checkpoint(self, step: int) -> None:
        self.wall_time, self.saved_step = time.time() - self.start_time, step
        state = {name: part.state_dict() for name, part in self.state.items()}
        checkpoint = dict(
            args=asdict(self.args), step=step, rng=rng_states(), evaluations=self.evaluations, state=state
        )
        checkpoint.update(wall_time_s=self.wall_time, eval_time_s=self.eval_time)
        checkpoint.update(critic_diverged_at_step=self.critic_diverged_at_step)
        write_atomically(self.run_dir / "checkpoint.pt", lambda path: torch.save(checkpoint, path))

    def finish(self) -> None:
        """Save the model, the policy file and summary.json. Stopped by a signal: the checkpoint, summary.json, the
        model and the policy file, in that order (what a kill after a short grace period loses least), then exit
        130 (Ctrl-C) or 143 (SIGTERM) with the command that resumes."""
        args, run_dir, step = self.args, self.run_dir, self.step
        stopped = stop_requested  # a signal that comes while the files are written changes nothing any more
        if stopped and self.saved_step != step:
            self.save_checkpoint(step)
        model_path = run_dir / f"{args.exp_name}.pt"
        final = self.evaluations[-1] if self.evaluations else {}
        status = "interrupted" if stopped else "finished"
        summary = dict(args=asdict(args), status=status, env_id=self.env_id, dataset=args.dataset, run_dir=str(run_dir))
        summary.update(model_path=str(model_path) if args.save_model else None, **self.extra)
        summary.update({f"final_{key}": final.get(key) for key in ("returns", "mean_return", "std_return")})
        summary.update(final_normalized_score=final.get("normalized_score"), total_steps=args.total_steps)
        summary.update(steps_done=step, wall_time_s=self.wall_time, eval_time_s=self.eval_time)
        summary.update(updates_per_second=step / (self.wall_time - self.eval_time), evaluations=self.evaluations)
        summary.update(critic_diverged_at_step=self.critic_diverged_at_step)
        summary.update(device=str(self.device), git_commit=git_commit())
        versions = dict(python=platform.python_version(), torch=torch.__version__, gymnasium=gym.__version__)
        summary["versions"] = dict(**versions, numpy=np.__version__)
        write_summary = lambda: write_atomically(  # noqa: E731
            run_dir / "summary.json", lambda path: path.write_text(json.dumps(summary, indent=2))
        )
        if stopped:
            write_summary()
        if args.save_model:
            write_atomically(model_path, lambda path: torch.save(self.model.state_dict(), path))
            self.save_policy_file(step)
            print(f"model saved to {model_path}, acting policy to {run_dir / 'policy.pt2'}")
        if not stopped:
            write_summary()
        self.writer.close()
        if stopped:
            print(
                f"interrupted ({STOP_SIGNALS[stopped]}) after step {step} of {args.total_steps}; continue "
                f"with:  python {sys.argv[0]} --resume {run_dir}",
                file=sys.stderr,
            )
            sys.exit(128 + stopped)
        print(
            f"final return {final['mean_return']:.1f} ± {final['std_return']:.1f} over {args.eval_episodes} "
            f"episodes; {summary['updates_per_second']:.0f} updates/s, {self.wall_time:.0f} s.\nRun folder "
            f"{run_dir} (summary.json, TensorBoard events: tensorboard --logdir runs)"
        )

    def save_policy_file(self, step: int) -> None:
        """policy.pt2: the acting function as a torch.export program, which torch.export.load(path).module() runs
        without this file and without pickle, and its env, action space and evaluation settings."""
        args, space, obs_dim = self.args, self.action_space, self.data["observations"].shape[1]
        kind = dict(low=space.low.tolist(), high=space.high.tolist()) if hasattr(space, "low") else dict(n=int(space.n))
        info = dict(env_id=self.env_id, algorithm=args.exp_name, dataset=args.dataset, step=step)
        info.update(
            observation_shape=[obs_dim], action_space=kind, reference_returns=self.metadata.get("reference_returns")
        )
        info.update(deterministic=self.deterministic, evaluation=dict(episodes=args.eval_episodes, seed=args.seed))
        info["evaluation"]["gamma"] = args.gamma
        acting = copy.deepcopy(self.acting).cpu().eval().requires_grad_(False)  # its actions convert to numpy
        batch = {0: torch.export.Dim("batch")}
        program = torch.export.export(acting, (torch.zeros(2, obs_dim),), dynamic_shapes=(batch,))
        archive = io.BytesIO()
        torch.export.save(program, archive, extra_files={"policy.json": json.dumps(info)})
        write_atomically(self.run_dir / "policy.pt2", lambda path: path.write_bytes(archive.getvalue()))


# ---- end of run bookkeeping ----


if __name__ == "__main__":
    run = Run()
    args, data, device, space = run.args, run.data, run.device, run.action_space
    obs_dim, discrete = data["observations"].shape[1], data["actions"].dtype == torch.long
    n_actions, action_dim = (int(space.n), 0) if discrete else (0, data["actions"].shape[1])
    bounds = ([], []) if discrete else (space.low, space.high)  # the acting function's buffers: none for Discrete
    low, high = (torch.tensor(bound, dtype=torch.float32, device=device) for bound in bounds)
    actor = Actor(obs_dim, action_dim, n_actions, args.hidden_dim).to(device)
    critic = TwinCritic(obs_dim, action_dim, n_actions, args.hidden_dim).to(device)
    value = mlp(obs_dim, 1, args.hidden_dim).to(device)
    if args.normalize_observations:
        actor.obs_mean.copy_(data["observations"].mean(dim=0))
        actor.obs_std.copy_(data["observations"].std(dim=0) + 1e-3)
    # Standardised and scaled once here, so that an update spends nothing on it.
    data["observations"] = actor.normalize(data["observations"])
    data["next_observations"] = actor.normalize(data["next_observations"])
    reward_scale = reward_scale_of(run.metadata["episode_returns"], args.normalize_rewards)
    data["rewards"] = data["rewards"] * reward_scale
    target_critic = copy.deepcopy(critic)
    # One Adam over three groups (update() says why); only the actor's group decays (cosine).
    groups = [{"params": module.parameters()} for module in (actor, critic, value)]
    optimizer = torch.optim.Adam(groups, lr=args.learning_rate, fused=True)
    decay = [lambda step: 0.5 * (1.0 + math.cos(math.pi * step / args.total_steps)), lambda _: 1.0, lambda _: 1.0]
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, decay)
    networks = {"actor": actor, "critic": critic, "target_critic": target_critic, "value": value}
    run.begin(
        state={**networks, "optimizer": optimizer, "schedule": schedule},  # the reward scale follows from the dataset
        model=nn.ModuleDict({"actor": actor, "critic": critic, "value": value}),
        acting=ActingPolicy(actor, low, high),
        q_initial=lambda observations, actions: q_initial(actor, critic, observations, reward_scale),
        extra={"reward_scale": reward_scale},
    )
    for step in run.steps():
        batch = sample(data, args.batch_size)
        scalars = update(
            step, batch, **networks, optimizer=optimizer, schedule=schedule, args=args, reward_scale=reward_scale
        )
        run.end_step(step, scalars)
    run.finish()
