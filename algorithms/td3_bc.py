"""TD3+BC, offline: Fujimoto and Gu, 2021, "A Minimalist Approach to Offline Reinforcement Learning",
https://arxiv.org/abs/2106.06860.

TD3 trained on a fixed dataset lets its deterministic actor climb to actions the data never took, whose
over-estimated values no new experience corrects. TD3+BC changes two things in TD3 (section 5): the actor's loss
gains a behaviour-cloning term that keeps pi(s) near the data's action, and observations are standardised:

    actor:   L = -lambda * Q1(s, pi(s)) + (pi(s) - a)^2,    lambda = alpha / mean_batch |Q1(s, pi(s))|   (eq. 3, 4)
    critic:  y = r + gamma * (1 - terminal) * min(Q1', Q2')(s', clip(pi'(s') + clip(N(0, sigma^2), -c, c), -1, 1))
             L = (Q1(s, a) - y)^2 + (Q2(s, a) - y)^2
    observations: (s - mean) / (std + 1e-3), the dataset's statistics                                    (eq. 5)

Dividing by the batch's mean |Q| makes alpha weigh the two terms alike whatever the rewards' scale, and the
gradient of lambda is not taken. TD3's three pieces stay: clipped double Q (the min), target policy smoothing with
noise sigma 0.2 clipped at c 0.5, and the delayed actor: the actor and the targets move every --policy-freq 2
critic updates. Everything costs about two TD3 updates: no sampled actions, no generative model.

    python algorithms/td3_bc.py --dataset datasets/Hopper-v5/medium-expert.npz
    python algorithms/td3_bc.py --dataset datasets/Hopper-v5/medium-expert.npz --total-steps 1000000   # the paper's

Actions live in the normalised box [-1, 1]^d (the paper's max_action 1), mapped to the env's bounds when acting;
the squared error is averaged over the action dimensions, as in the authors' code (sfujim/TD3_BC), whose defaults
these are except where a field says otherwise. Continuous actions only. The algorithm ends at the line
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

ACTION_KIND = "box"  # the action spaces this script learns: "discrete", "box" or "both"
DATASET_KEYS = ("observations", "actions", "rewards", "next_observations", "terminations")


@dataclass
class AlgorithmArgs:
    dataset: str = "datasets/Hopper-v5/medium-expert.npz"
    """dataset file (.npz) made by data_collection/collect_dataset.py"""
    total_steps: int = 100_000
    """number of critic updates (paper: 1M; 100k here: 1M is 2.5 hours on a CPU core, results/speed_td3_bc_iql.md)"""
    eval_freq: int = 10_000
    """evaluate every this many gradient steps (and after the last one)"""
    save_model: bool = True
    """save nn.ModuleDict(actor=..., critic=...)'s state_dict to <run folder>/<exp_name>.pt and the acting function
    to policy.pt2"""
    actor_lr: float = 3e-4
    """Adam learning rate of the actor"""
    critic_lr: float = 3e-4
    """Adam learning rate of the critics"""
    batch_size: int = 256
    """transitions per gradient step"""
    hidden_dim: int = 256
    """width of the two hidden layers of the actor and of each critic"""
    gamma: float = 0.99
    """discount factor"""
    tau: float = 0.005
    """Polyak averaging rate of the target actor and critics, applied at each actor update"""
    alpha: float = 1.0
    """weight of Q against behaviour cloning, eq. 4 (paper: 2.5; 1 here: at 2.5 Q diverged, results/td3_bc_iql.md)"""
    policy_noise: float = 0.2
    """std of the target policy smoothing noise, in the normalised action box"""
    noise_clip: float = 0.5
    """the smoothing noise is clipped to +-noise_clip"""
    policy_freq: int = 2
    """critic updates per actor and target update (TD3's delayed policy update)"""
    layer_norm: bool = False
    """LayerNorm before each hidden ReLU of the critics (ReBRAC's; Yue et al. 2023: it stops Q divergence)"""
    normalize_observations: bool = True
    """standardise observations with the dataset's mean and std (eq. 5), kept in the saved model"""


def check_flags(args: "Args") -> None:
    """Refuse this algorithm's flags where they cannot make a run (the run bookkeeping checks the others)."""
    for name in ("batch_size", "hidden_dim", "policy_freq"):
        if getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    for name in ("actor_lr", "critic_lr"):
        if not 0.0 < getattr(args, name) < math.inf:
            fail(f"--{name.replace('_', '-')} must be a positive finite number, got {getattr(args, name)}")
    if not 0.0 <= args.gamma <= 1.0:
        fail(f"--gamma must be in [0, 1], got {args.gamma}")
    if not 0.0 < args.tau <= 1.0:
        fail(f"--tau must be in (0, 1], got {args.tau}")
    for name in ("alpha", "policy_noise", "noise_clip"):  # alpha 0 is behaviour cloning, noise 0 no smoothing
        if not 0.0 <= getattr(args, name) < math.inf:
            fail(f"--{name.replace('_', '-')} must be a finite number at least 0, got {getattr(args, name)}")


# ------------------------------------------------------------------------------------------------- networks
def mlp(input_dim: int, output_dim: int, hidden_dim: int, layer_norm: bool = False) -> nn.Sequential:
    layers, width = [], input_dim
    for _ in range(2):
        layers += [nn.Linear(width, hidden_dim), *([nn.LayerNorm(hidden_dim)] if layer_norm else []), nn.ReLU()]
        width = hidden_dim
    return nn.Sequential(*layers, nn.Linear(width, output_dim))


class Actor(nn.Module):
    """pi(s) = tanh(network(s)) in [-1, 1]^d on standardised observations. The dataset's observation mean and std
    and the env's action bounds are buffers, so the saved actor acts on its own: act() takes raw observations."""

    def __init__(self, obs_dim: int, action_dim: int, hidden_dim: int, action_low: np.ndarray, action_high: np.ndarray):
        super().__init__()
        self.network = mlp(obs_dim, action_dim, hidden_dim)
        self.register_buffer("obs_mean", torch.zeros(obs_dim))
        self.register_buffer("obs_std", torch.ones(obs_dim))
        self.register_buffer("action_low", torch.as_tensor(action_low, dtype=torch.float32))
        self.register_buffer("action_high", torch.as_tensor(action_high, dtype=torch.float32))

    def forward(self, observations: torch.Tensor) -> torch.Tensor:
        """Actions in [-1, 1] for standardised observations."""
        return torch.tanh(self.network(observations))

    def normalize(self, observations: torch.Tensor) -> torch.Tensor:
        return (observations - self.obs_mean) / self.obs_std

    def act(self, observations: torch.Tensor) -> torch.Tensor:
        """Actions in the env's units for raw observations."""
        return unnormalize_actions(self.forward(self.normalize(observations)), self.action_low, self.action_high)


class TwinCritic(nn.Module):
    """Q1 and Q2, two independent networks of standardised observations and actions in [-1, 1]."""

    def __init__(self, obs_dim: int, action_dim: int, hidden_dim: int, layer_norm: bool = False):
        super().__init__()
        self.q1 = mlp(obs_dim + action_dim, 1, hidden_dim, layer_norm)
        self.q2 = mlp(obs_dim + action_dim, 1, hidden_dim, layer_norm)

    def forward(self, observations: torch.Tensor, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = torch.cat([observations, actions], dim=-1)
        return self.q1(inputs).squeeze(-1), self.q2(inputs).squeeze(-1)


class ActingPolicy(nn.Module):
    """The acting function that evaluation plays and policy.pt2 holds: raw env observations in, env actions out."""

    def __init__(self, actor: Actor):
        super().__init__()
        self.actor = actor

    def forward(self, observations: torch.Tensor) -> torch.Tensor:
        return self.actor.act(observations)


def q_initial(actor: Actor, critic: TwinCritic, observations: torch.Tensor) -> torch.Tensor:
    """min(Q1, Q2)(s, pi(s)) at raw observations: the critic's estimate of the return that evaluation compares."""
    normalized = actor.normalize(observations)
    return torch.minimum(*critic(normalized, actor(normalized)))


# ------------------------------------------------------------------------------------------------- the maths
def smoothed_target_actions(target_actions: torch.Tensor, noise: torch.Tensor, noise_clip: float) -> torch.Tensor:
    """TD3's target policy smoothing: pi'(s') + noise clipped to +-noise_clip, the sum clipped to the box [-1, 1]."""
    return (target_actions + noise.clamp(-noise_clip, noise_clip)).clamp(-1.0, 1.0)


def td3_target(
    rewards: torch.Tensor, terminations: torch.Tensor, next_q1: torch.Tensor, next_q2: torch.Tensor, gamma: float
) -> torch.Tensor:
    """r + gamma * (1 - terminal) * min(Q1', Q2'): TD3's clipped double Q-learning."""
    return rewards + gamma * (1.0 - terminations) * torch.minimum(next_q1, next_q2)


def td3_bc_actor_loss(
    q_policy: torch.Tensor, policy_actions: torch.Tensor, data_actions: torch.Tensor, alpha: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The paper's eq. 3 with eq. 4: -lambda * mean Q1(s, pi(s)) + mean (pi(s) - a)^2, lambda = alpha / mean |Q1|
    (a constant: its gradient is not taken). Returns the loss, lambda and the behaviour-cloning term."""
    lmbda = alpha / q_policy.abs().mean().detach()
    bc_term = F.mse_loss(policy_actions, data_actions)
    return -lmbda * q_policy.mean() + bc_term, lmbda, bc_term


# ------------------------------------------------------------------------------------------------- one update
def update(
    step: int,
    batch: dict[str, torch.Tensor],
    actor: Actor,
    critic: TwinCritic,
    target_actor: Actor,
    target_critic: TwinCritic,
    actor_optimizer: torch.optim.Optimizer,
    critic_optimizer: torch.optim.Optimizer,
    args: AlgorithmArgs,
) -> dict[str, torch.Tensor]:
    """One gradient step of the critics, and of the actor and the targets every --policy-freq steps (from step 1 on).
    The batch's observations are standardised and its actions in [-1, 1]. Returns the scalars to log, as tensors."""
    observations, actions, rewards = batch["observations"], batch["actions"], batch["rewards"]
    # Critics: clipped double Q with target policy smoothing.
    with torch.no_grad():
        noise = torch.randn_like(actions) * args.policy_noise
        next_actions = smoothed_target_actions(target_actor(batch["next_observations"]), noise, args.noise_clip)
        next_q1, next_q2 = target_critic(batch["next_observations"], next_actions)
        targets = td3_target(rewards, batch["terminations"], next_q1, next_q2, args.gamma)
    q1, q2 = critic(observations, actions)
    critic_loss = F.mse_loss(q1, targets) + F.mse_loss(q2, targets)
    critic_optimizer.zero_grad()
    critic_loss.backward()
    critic_optimizer.step()
    scalars = {
        "losses/critic_loss": critic_loss,
        "diagnostics/q_data": q1.detach().mean(),
        "diagnostics/target": targets.mean(),
    }
    # Delayed actor (eq. 3): the gradient flows through Q1 into the actor only; the targets follow.
    if step % args.policy_freq == 1 % args.policy_freq:
        policy_actions = actor(observations)
        q_policy = critic.q1(torch.cat([observations, policy_actions], dim=-1)).squeeze(-1)
        actor_loss, lmbda, bc_term = td3_bc_actor_loss(q_policy, policy_actions, actions, args.alpha)
        actor_optimizer.zero_grad()
        actor_loss.backward(inputs=list(actor.parameters()))
        actor_optimizer.step()
        with torch.no_grad():  # one fused lerp over all parameters: target <- target + tau * (online - target)
            target_parameters = [*target_actor.parameters(), *target_critic.parameters()]
            torch._foreach_lerp_(target_parameters, [*actor.parameters(), *critic.parameters()], args.tau)
        scalars.update({"losses/actor_loss": actor_loss, "diagnostics/lambda": lmbda, "diagnostics/bc_mse": bc_term})
    return scalars


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
    args, data, device = run.args, run.data, run.device
    obs_dim, action_dim = data["observations"].shape[1], data["actions"].shape[1]
    low, high = run.action_space.low, run.action_space.high
    actor = Actor(obs_dim, action_dim, args.hidden_dim, low, high).to(device)
    critic = TwinCritic(obs_dim, action_dim, args.hidden_dim, args.layer_norm).to(device)
    if args.normalize_observations:
        actor.obs_mean.copy_(data["observations"].mean(dim=0))
        actor.obs_std.copy_(data["observations"].std(dim=0) + 1e-3)
    # Standardised once here, so that an update spends nothing on it.
    data["observations"] = actor.normalize(data["observations"])
    data["next_observations"] = actor.normalize(data["next_observations"])
    target_actor, target_critic = copy.deepcopy(actor), copy.deepcopy(critic)
    actor_optimizer = torch.optim.Adam(actor.parameters(), lr=args.actor_lr, fused=True)
    critic_optimizer = torch.optim.Adam(critic.parameters(), lr=args.critic_lr, fused=True)
    networks = {"actor": actor, "critic": critic, "target_actor": target_actor, "target_critic": target_critic}
    optimizers = {"actor_optimizer": actor_optimizer, "critic_optimizer": critic_optimizer}
    run.begin(
        state={**networks, **optimizers},
        model=nn.ModuleDict({"actor": actor, "critic": critic}),
        acting=ActingPolicy(actor),
        q_initial=lambda observations, actions: q_initial(actor, critic, observations),
    )
    for step in run.steps():
        batch = sample(data, args.batch_size)
        run.end_step(step, update(step, batch, **networks, **optimizers, args=args))
    run.finish()
