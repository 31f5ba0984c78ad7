"""Continuous BCQ, offline: Fujimoto, Meger and Precup, 2019, "Off-Policy Deep Reinforcement Learning without
Exploration", https://arxiv.org/abs/1812.02900.

Offline actor-critic goes wrong where its actor picks actions the dataset never took: their values are never
corrected, only over-estimated (the paper's extrapolation error, section 3). Batch-Constrained Q-learning acts
only with actions like the data's. A conditional VAE G(a|s) learns the dataset's actions, a perturbation network
xi(s, a) moves a sampled action by at most phi, and twin critics value the result (section 4, algorithm 1):

    VAE:     (mu, sigma) = E(s, a),  L = ||D(s, mu + sigma * eps) - a||^2 + 0.5 * KL(N(mu, sigma) || N(0, 1))
    policy:  pi(s) = the a_j + xi(s, a_j) with the highest Q1,  a_j = D(s, z_j),  z_j ~ N(0, 1) clipped to +-0.5
    target:  y = r + gamma * (1 - terminal) * max_j [lmbda * min(Q1', Q2') + (1 - lmbda) * max(Q1', Q2')](s', a'_j)
    critic:  (Q1(s, a) - y)^2 + (Q2(s, a) - y)^2            actor:  maximise Q1(s, a_j + xi(s, a_j))

The target (eq. 13) takes --target-samples actions per next state, perturbed by the target actor and valued by
the target critics; acting takes --act-samples and keeps the one with the highest Q1. lmbda 1 is TD3's clipped
double Q. phi 0 is behaviour cloning filtered by Q; a large phi is DDPG.

    python algorithms/bcq_continuous.py --dataset datasets/BipedalWalker-v3/expert.npz
    python algorithms/bcq_continuous.py --dataset datasets/Hopper-v5/noisy.npz --seed 2

The networks work in a normalised action box [-1, 1]^act_dim, mapped to the env's bounds (low, high) before
env.step, so the perturbation is at most phi * (high - low) / 2 in env units (the author's phi * max_action),
and on observations standardised with the dataset's mean and std. Defaults follow the author's code, sfujim/BCQ,
except where a field says otherwise; the measurements behind them are in results/ablations.md.
"""

import copy
import io
import json
import math
import os
import platform
import random
import signal
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


@dataclass
class Args:
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
    save_model: bool = True
    """save the VAE's, actor's and critics' state_dict (one BCQPolicy) to <run folder>/<exp_name>.pt and the acting
    function to policy.pt2"""
    dataset: str = "datasets/BipedalWalker-v3/expert.npz"
    """dataset file (.npz) made by data_collection/collect_dataset.py"""
    env_id: Optional[str] = None
    """env to evaluate on; None: the dataset's env_id"""
    total_steps: int = 30_000
    """number of gradient steps (paper: 1M; 30k here: a run takes 37 minutes on one CPU core, results/README.md)"""
    eval_freq: int = 5_000
    """evaluate every this many gradient steps (and after the last one)"""
    eval_episodes: int = 10
    """episodes per evaluation, run together in a vector env"""
    threads: int = 1
    """torch CPU threads: 1 is fastest for these small networks and lets parallel runs share the cores"""
    resume: Optional[str] = None
    """run folder to continue from its last checkpoint, with the flags it was started with"""
    clip_actions: bool = False
    """clip dataset actions outside the env's bounds into them, instead of refusing the dataset"""

    # continuous BCQ
    learning_rate: float = 1e-3
    """Adam learning rate of the VAE, the actor and the critics"""
    batch_size: int = 100
    """transitions per gradient step"""
    gamma: float = 0.99
    """discount factor"""
    tau: float = 0.005
    """Polyak averaging rate of the target actor and critics, applied after every gradient step"""
    lmbda: float = 0.75
    """weight of min(Q1, Q2) in the soft clipped double-Q target (1 - lmbda goes to the max)"""
    phi: float = 0.05
    """largest perturbation of a sampled action, as a fraction of half the action range"""
    target_samples: int = 10
    """actions sampled from the VAE per next state in the target"""
    act_samples: int = 100
    """actions sampled from the VAE per state when acting"""
    vae_hidden_dim: int = 750
    """width of the VAE encoder's and decoder's two hidden layers"""
    layer_norm: bool = False
    """LayerNorm before each hidden ReLU of the critics (ReBRAC's; Yue et al. 2023: it stops Q divergence)"""
    normalize_observations: bool = True
    """standardise observations with the dataset's mean and std, kept in the saved model
    (paper: raw observations; here: without it BCQ fails on Hopper's expert data, results/ablations.md)"""
    log_freq: int = 100
    """gradient steps between loss logs"""


def fail(message: str) -> NoReturn:
    """Stop with one line on stderr and exit status 2, without a traceback."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def validate_args(args: Args) -> None:
    """Refuse flags that cannot make a run, before anything is written."""
    for name in ("total_steps", "eval_freq", "eval_episodes", "threads", "batch_size", "vae_hidden_dim", "log_freq",
                 "target_samples", "act_samples"):
        if getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    for name in ("seed", "phi"):  # phi 0 is behaviour cloning filtered by Q
        if not 0 <= getattr(args, name) < math.inf:
            fail(f"--{name.replace('_', '-')} must be at least 0, got {getattr(args, name)}")
    if not 0.0 < args.learning_rate < math.inf:
        fail(f"--learning-rate must be positive, got {args.learning_rate}")
    if not 0.0 < args.tau <= 1.0:
        fail(f"--tau must be in (0, 1], got {args.tau}")
    for name in ("gamma", "lmbda"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            fail(f"--{name} must be in [0, 1], got {getattr(args, name)}")


# ------------------------------------------------------------------------------------------------- dataset
def load_dataset(path: str, device: torch.device) -> tuple[dict[str, torch.Tensor], dict]:
    """The whole dataset as tensors on the device, so that a batch is one torch.randint and an index.
    Whatever is wrong with the file stops the run here, with one line that names it."""
    if not Path(path).is_file():
        env_id, policy = Path(path).parent.name or "BipedalWalker-v3", Path(path).stem
        fail(f"dataset {path} does not exist. Build it with:  " + (
            f"python data_collection/collect_dataset.py --env-id {env_id} --policy {policy} --output {path}"
            if policy in ("expert", "noisy", "random") else "the commands in results/README.md"))
    try:
        with np.load(path, allow_pickle=False) as file:
            arrays = {key: file[key] for key in file.files}
        metadata = json.loads(str(arrays.pop("metadata")))
    except Exception as error:  # numpy, zipfile, zlib and json each raise their own kind for a damaged file
        text = str(error)
        reason = ("an array holds Python objects" if "Object arrays" in text else "it is not a .npz file"
                  if "pickled" in text else "it has no metadata" if isinstance(error, KeyError)
                  else f"{type(error).__name__}: {text}")
        fail(f"cannot read {path}: {reason}. Make datasets with data_collection/collect_dataset.py")
    keys = ("observations", "actions", "rewards", "next_observations", "terminations")
    missing = [key for key in keys if key not in arrays]
    if missing or not isinstance(metadata, dict):
        fail(f"{path} is not a dataset of data_collection/collect_dataset.py: "
             + (f"it lacks {', '.join(missing)}" if missing else "its metadata is not a JSON object"))
    if arrays["actions"].ndim != 2 or arrays["actions"].dtype.kind != "f":
        fail(f"{path} has discrete (Discrete) actions; this script needs continuous (Box) actions: "
             f"use algorithms/bcq_discrete.py or algorithms/cql_discrete_lunarlander.py")
    shapes = {key: arrays[key].shape for key in keys}
    n, obs_dim = shapes["observations"] if len(shapes["observations"]) == 2 else (0, 0)
    expected = {"observations": (n, obs_dim), "next_observations": (n, obs_dim), "rewards": (n,), "terminations": (n,),
                "actions": (n, *shapes["actions"][1:2])}
    if n == 0 or any(shapes[key] != expected[key] for key in keys):
        fail(f"{path}: the arrays' shapes {shapes} are not observations and next_observations [N, obs_dim], "
             f"actions [N] or [N, action_dim], rewards and terminations [N], with N at least 1")
    for key in keys:
        if arrays[key].dtype.kind not in "fiub":  # terminations are booleans
            fail(f"{path}: {key} have dtype {arrays[key].dtype}, not numbers")
        if not np.isfinite(arrays[key]).all():
            fail(f"{path}: {key} hold {np.count_nonzero(~np.isfinite(arrays[key]))} NaN or infinite values; "
                 f"drop those transitions or collect the dataset again")
    # Only true terminations stop bootstrapping; a time-limit truncation still bootstraps.
    data = {key: torch.tensor(arrays[key], dtype=torch.float32, device=device) for key in keys}
    return data, metadata


def validate_env(args: Args, data: dict[str, torch.Tensor], metadata: dict) -> tuple[str, gym.spaces.Space]:
    """The env to evaluate on and its action space, once the dataset is known to fit it; else one line and exit 2."""
    env_id = args.env_id or metadata.get("env_id")
    if env_id is None:
        fail(f"{args.dataset} does not name its env; give --env-id")
    if args.capture_video:
        prepare_rendering(env_id)
    try:
        probe_env = gym.make(env_id)
    except gym.error.Error as error:
        fail(f"cannot make env {env_id!r}: {error}")
    space = probe_env.action_space
    probe_env.close()
    if not isinstance(space, gym.spaces.Box) or not (np.isfinite(space.low).all() and np.isfinite(space.high).all()):
        fail(f"{env_id} has actions {space}; this script needs a Box action space with finite bounds")
    obs_dim, action_dim = data["observations"].shape[1], data["actions"].shape[1]
    data_space = metadata.get("action_space", {})
    data_low, data_high = data_space.get("low", space.low.tolist()), data_space.get("high", space.high.tolist())
    if (probe_env.observation_space.shape != (obs_dim,) or space.shape != (action_dim,)
            or not np.allclose(data_low, space.low) or not np.allclose(data_high, space.high)):
        fail(f"dataset and env do not match: dataset {args.dataset} has obs_dim {obs_dim} and actions of shape "
             f"({action_dim},) in [{data_low}, {data_high}], env {env_id} has observation shape "
             f"{probe_env.observation_space.shape} and actions of shape {space.shape} in "
             f"[{space.low.tolist()}, {space.high.tolist()}]")
    data_min, data_max = (values.cpu().numpy() for values in data["actions"].aminmax(dim=0))
    low, high = space.low.astype(np.float32), space.high.astype(np.float32)  # in the data's precision
    if not args.clip_actions and ((data_min < low - 1e-4).any() or (data_max > high + 1e-4).any()):
        fail(f"{args.dataset}: actions range over [{data_min.tolist()}, {data_max.tolist()}], outside the env's "
             f"bounds [{space.low.tolist()}, {space.high.tolist()}]; --clip-actions clips them")
    return env_id, space


# ------------------------------------------------------------------------------------------------- networks
def mlp(in_dim: int, hidden_dims: tuple[int, ...], out_dim: int, layer_norm: bool = False) -> nn.Sequential:
    layers, width = [], in_dim
    for hidden_dim in hidden_dims:
        layers += [nn.Linear(width, hidden_dim), *([nn.LayerNorm(hidden_dim)] if layer_norm else []), nn.ReLU()]
        width = hidden_dim
    return nn.Sequential(*layers, nn.Linear(width, out_dim))


class VAE(nn.Module):
    """Conditional VAE of the dataset's (normalised) actions: encoder (s, a) -> (mean, std), decoder (s, z) -> a."""

    def __init__(self, obs_dim: int, act_dim: int, hidden_dim: int):
        super().__init__()
        self.latent_dim = 2 * act_dim
        self.encoder = mlp(obs_dim + act_dim, (hidden_dim,), hidden_dim)
        self.mean = nn.Linear(hidden_dim, self.latent_dim)
        self.log_std = nn.Linear(hidden_dim, self.latent_dim)
        self.decoder = mlp(obs_dim + self.latent_dim, (hidden_dim, hidden_dim), act_dim)

    def forward(self, observations: torch.Tensor, actions: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Reconstructed actions, latent mean and latent std (the reparameterisation trick)."""
        hidden = F.relu(self.encoder(torch.cat([observations, actions], dim=1)))
        mean = self.mean(hidden)
        std = self.log_std(hidden).clamp(-4, 15).exp()  # log std clamped for stability, as the author's
        return self.decode(observations, mean + std * torch.randn_like(std)), mean, std

    def decode(self, observations: torch.Tensor, latent: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Actions in [-1, 1]; without a latent, z ~ N(0, 1) clipped to [-0.5, 0.5] keeps samples near the data's
        mode."""
        if latent is None:
            # shape[0], not len(): len() is a plain int to torch.export, which would fix policy.pt2's batch size.
            latent = torch.randn(observations.shape[0], self.latent_dim, device=observations.device)
            latent = latent.clamp(-0.5, 0.5)
        return torch.tanh(self.decoder(torch.cat([observations, latent], dim=1)))


class Perturbation(nn.Module):
    """The actor xi(s, a): moves a sampled action by at most phi in each dimension."""

    def __init__(self, obs_dim: int, act_dim: int, phi: float):
        super().__init__()
        self.phi = phi
        self.network = mlp(obs_dim + act_dim, (400, 300), act_dim)

    def forward(self, observations: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        return perturb(actions, self.network(torch.cat([observations, actions], dim=1)), self.phi)


class Critic(nn.Module):
    """Twin critics Q1, Q2 (s, a) -> value, each 400-300."""

    def __init__(self, obs_dim: int, act_dim: int, layer_norm: bool = False):
        super().__init__()
        self.q1_network = mlp(obs_dim + act_dim, (400, 300), 1, layer_norm)
        self.q2_network = mlp(obs_dim + act_dim, (400, 300), 1, layer_norm)

    def forward(self, observations: torch.Tensor, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = torch.cat([observations, actions], dim=1)
        return self.q1_network(inputs).squeeze(1), self.q2_network(inputs).squeeze(1)

    def q1(self, observations: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        return self.q1_network(torch.cat([observations, actions], dim=1)).squeeze(1)


class BCQPolicy(nn.Module):
    """Everything that acts, in one module so that one state_dict holds it: VAE, actor, critics, the dataset's
    observation mean and std and the env's action bounds (buffers). The networks see standardised observations
    and actions in [-1, 1]; act() takes raw observations."""

    def __init__(self, obs_dim: int, act_dim: int, action_low: np.ndarray, action_high: np.ndarray, phi: float,
                 vae_hidden_dim: int = 750, layer_norm: bool = False):
        super().__init__()
        self.vae = VAE(obs_dim, act_dim, vae_hidden_dim)
        self.actor = Perturbation(obs_dim, act_dim, phi)
        self.critic = Critic(obs_dim, act_dim, layer_norm)
        self.register_buffer("obs_mean", torch.zeros(obs_dim))
        self.register_buffer("obs_std", torch.ones(obs_dim))
        self.register_buffer("action_low", torch.as_tensor(action_low, dtype=torch.float32))
        self.register_buffer("action_high", torch.as_tensor(action_high, dtype=torch.float32))

    def normalize(self, observations: torch.Tensor) -> torch.Tensor:
        return (observations - self.obs_mean) / self.obs_std

    def act(self, observations: torch.Tensor, num_samples: int) -> tuple[torch.Tensor, torch.Tensor]:
        """BCQ's policy on raw observations: num_samples decoded and perturbed actions per state, the one with the
        highest Q1. Returns the chosen actions in [-1, 1] and their Q1."""
        repeated = torch.repeat_interleave(self.normalize(observations), num_samples, dim=0)
        candidates = self.actor(repeated, self.vae.decode(repeated))
        q1 = self.critic.q1(repeated, candidates)
        return best_sampled_action(q1.view(-1, num_samples), candidates.view(observations.shape[0], num_samples, -1))


# ------------------------------------------------------------------------------------------------- the maths
def normalize_actions(actions: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Env units [low, high] -> [-1, 1]."""
    return 2.0 * (actions - low) / (high - low) - 1.0


def unnormalize_actions(actions: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> env units [low, high]."""
    return low + 0.5 * (actions + 1.0) * (high - low)


def perturb(actions: torch.Tensor, raw_output: torch.Tensor, phi: float) -> torch.Tensor:
    """a + phi * tanh(raw), clipped to [-1, 1]: the perturbation is at most phi in each dimension."""
    return (actions + phi * torch.tanh(raw_output)).clamp(-1.0, 1.0)


def soft_clipped_double_q(q1: torch.Tensor, q2: torch.Tensor, lmbda: float) -> torch.Tensor:
    """lambda * min(Q1, Q2) + (1 - lambda) * max(Q1, Q2): the paper's eq. 13 before the max over actions."""
    return lmbda * torch.minimum(q1, q2) + (1.0 - lmbda) * torch.maximum(q1, q2)


def bcq_target(rewards: torch.Tensor, terminations: torch.Tensor, next_q1: torch.Tensor, next_q2: torch.Tensor,
               gamma: float, lmbda: float) -> torch.Tensor:
    """r + gamma * (1 - terminal) * max_j soft_clipped_double_q(Q1'(s', a_j), Q2'(s', a_j)); next_q1 and next_q2
    are [batch, samples], one column per action sampled from the VAE and perturbed by the target actor."""
    next_value = soft_clipped_double_q(next_q1, next_q2, lmbda).max(dim=1).values
    return rewards + gamma * (1.0 - terminations) * next_value


def best_sampled_action(q_values: torch.Tensor, candidates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each state, the candidate action ([batch, samples, act_dim]) with the highest Q ([batch, samples]), and
    that Q."""
    best_q, best = q_values.max(dim=1)
    return candidates[torch.arange(candidates.shape[0], device=candidates.device), best], best_q


def vae_kl(mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, std) || N(0, 1)), averaged over the batch and the latent dimensions (as the author's)."""
    return -0.5 * (1.0 + torch.log(std.pow(2)) - mean.pow(2) - std.pow(2)).mean()


# ------------------------------------------------------------------------------------------------- evaluation
class ActingPolicy(nn.Module):
    """The acting function that evaluation plays and policy.pt2 holds: raw env observations in, env actions out."""

    def __init__(self, policy: BCQPolicy, num_samples: int):
        super().__init__()
        self.policy = policy
        self.num_samples = num_samples

    def forward(self, observations: torch.Tensor) -> torch.Tensor:
        # The latents come from torch's global generator: an exported program cannot take a torch.Generator.
        chosen, _ = self.policy.act(observations, self.num_samples)
        return unnormalize_actions(chosen, self.policy.action_low, self.policy.action_high)


def evaluate(acting: ActingPolicy, env_id: str, episodes: int, seed: int, gamma: float, device: torch.device,
             reference_returns: Optional[dict], video_folder: Optional[Path] = None,
             video_prefix: str = "eval") -> dict:
    """Episodes of the BCQ policy batched in a vector env; returns the evaluation's record: mean_return, std_return,
    normalized_score (None without reference returns), q_initial (mean Q1 of the first chosen actions),
    discounted_return_initial and the episodes' returns. The VAE's latents come from torch's generator seeded with
    `seed` in a fork of its state, so a policy's evaluation is reproducible (results/evaluate_policy.py seeds it the
    same way and replays it) and leaves the training's random numbers as they were."""

    def make_env(index: int):
        def thunk():
            if video_folder is not None and index == 0:
                env = gym.make(env_id, render_mode="rgb_array")
                return gym.wrappers.RecordVideo(env, str(video_folder), episode_trigger=lambda episode: episode == 0,
                                                name_prefix=video_prefix, disable_logger=True)
            return gym.make(env_id)
        return thunk

    envs = gym.vector.SyncVectorEnv([make_env(i) for i in range(episodes)],
                                    autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
    observations, _ = envs.reset(seed=[seed * 1000 + i for i in range(episodes)])
    returns, discounted_returns = np.zeros(episodes), np.zeros(episodes)
    running = np.ones(episodes, dtype=bool)
    discount = 1.0
    q_initial = None
    policy = acting.policy
    policy.eval()
    # Every episode is acted for at every step, the finished ones too (their envs have reset; what they return is
    # ignored), so that the latents drawn are those of results/evaluate_policy.py, which plays the same way.
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(seed)
        while running.any():
            observation_tensor = torch.tensor(observations, dtype=torch.float32, device=device)
            actions = acting(observation_tensor)
            if q_initial is None:  # the critics take actions in [-1, 1]; valuing them draws no random numbers
                normalised_actions = normalize_actions(actions, policy.action_low, policy.action_high).clamp(-1.0, 1.0)
                q_initial = policy.critic.q1(policy.normalize(observation_tensor), normalised_actions).cpu().numpy()
            observations, rewards, terminations, truncations, _ = envs.step(actions.cpu().numpy())
            returns += np.where(running, rewards, 0.0)
            discounted_returns += np.where(running, discount * rewards, 0.0)
            discount *= gamma
            running &= ~(terminations | truncations)
    envs.close()
    policy.train()
    mean_return = float(returns.mean())
    return {"mean_return": mean_return, "std_return": float(returns.std()),
            "normalized_score": normalized_score(mean_return, reference_returns), "q_initial": float(q_initial.mean()),
            "discounted_return_initial": float(discounted_returns.mean()), "returns": returns.tolist()}


def normalized_score(mean_return: float, reference_returns: dict) -> Optional[float]:
    """D4RL's normalised score: 0 is a uniform random policy, 100 the expert that made the dataset's references."""
    if not reference_returns or reference_returns.get("expert") is None:
        return None
    low, high = reference_returns["random"], reference_returns["expert"]
    return 100.0 * (mean_return - low) / (high - low)


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
            if backend:
                os.environ["MUJOCO_GL"] = backend
            return
        reason = (result.stderr.strip().splitlines() or ["no output"])[-1]
    fail(f"--capture-video cannot render {env_id} (MUJOCO_GL={'/'.join(map(str, backends))}: {reason}). Without a "
         f"screen MuJoCo renders with EGL or OSMesa: install one (apt install libegl1 or libosmesa6), or drop "
         f"--capture-video")


def export_policy(acting: nn.Module, obs_dim: int, path: Path, info: dict) -> None:
    """Save the acting function as a torch.export program with info as policy.json: loadable without this file
    and without pickle, by torch.export.load(path).module(), on the CPU, for any batch size."""
    acting = copy.deepcopy(acting).cpu().eval().requires_grad_(False)  # so that its actions convert to numpy
    program = torch.export.export(acting, (torch.zeros(2, obs_dim),),
                                  dynamic_shapes=({0: torch.export.Dim("batch")},))
    archive = io.BytesIO()
    torch.export.save(program, archive, extra_files={"policy.json": json.dumps(info)})
    write_atomically(path, lambda temporary: temporary.write_bytes(archive.getvalue()))


def git_commit() -> Optional[str]:
    """The commit of the checkout this file lies in, with "-dirty" for uncommitted changes; None outside one."""
    folder = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True, timeout=10)
        status = subprocess.run(["git", "status", "--porcelain", "--", Path(__file__).name], cwd=folder,
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if commit.returncode != 0:
        return None
    return commit.stdout.strip() + ("-dirty" if status.stdout.strip() else "")


# ------------------------------------------------------------------------------------------------- runs
def make_run_dir(name: str) -> Path:
    """A new folder runs/<name>: mkdir is atomic, so two runs started in the same second get a folder each."""
    Path("runs").mkdir(exist_ok=True)
    for attempt in range(1, 1000):
        run_dir = Path("runs") / (name if attempt == 1 else f"{name}-{attempt}")
        try:
            run_dir.mkdir()
            return run_dir
        except FileExistsError:
            continue
    fail(f"runs/{name} and 998 suffixed folders exist already; choose another --exp-name")


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Write to a temporary name, then rename: a crash while writing leaves the previous file whole."""
    temporary = path.with_name(f".{path.name}.tmp")
    write(temporary)
    os.replace(temporary, path)


def rng_states() -> dict:
    numpy_state = np.random.get_state()
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "numpy": [numpy_state[0], torch.from_numpy(numpy_state[1].astype(np.int64)), *numpy_state[2:]]}


def set_rng_states(states: dict) -> None:
    random.setstate(states["python"])
    torch.set_rng_state(states["torch"])
    name, keys, *rest = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))


def load_checkpoint(args: Args) -> tuple[Args, dict]:
    """The checkpoint in the --resume folder, and the flags that run was started with."""
    given = [f"--{field.name.replace('_', '-')}" for field in fields(Args)
             if field.name != "resume" and getattr(args, field.name) != field.default]
    if given:
        fail(f"--resume continues a run with the flags it was started with; drop {' '.join(given)}")
    path = Path(args.resume) / "checkpoint.pt"
    if not path.is_file():
        fail(f"{path} does not exist: --resume takes the run folder of a run that reached its first evaluation")
    try:
        checkpoint = torch.load(path, weights_only=True)
        saved = Args(**{**checkpoint["args"], "resume": args.resume})
    except Exception as error:  # torch, pickle and zipfile each raise their own kind for a damaged file
        fail(f"cannot read {path} ({type(error).__name__}); give the run folder of a run of {Path(__file__).name}")
    if checkpoint["step"] >= saved.total_steps:
        fail(f"the run in {args.resume} has finished ({checkpoint['step']} steps); there is nothing to resume")
    return saved, checkpoint


stop_requested = False


def stop_after_this_step(signum, frame) -> None:
    """Ctrl-C: finish the update under way, so that the checkpoint holds a consistent state; a second one stops now."""
    global stop_requested
    stop_requested = True
    print("stopping after this step, with a checkpoint (Ctrl-C again stops at once)", file=sys.stderr, flush=True)
    signal.signal(signal.SIGINT, stop_at_once)


def stop_at_once(signum, frame) -> None:
    print("interrupted: stopped without saving; the last checkpoint, if any, is kept", file=sys.stderr)
    os._exit(130)


# ------------------------------------------------------------------------------------------------- main
if __name__ == "__main__":
    signal.signal(signal.SIGINT, stop_at_once)
    args = tyro.cli(Args, description=__doc__)
    args, checkpoint = load_checkpoint(args) if args.resume else (args, None)
    validate_args(args)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")

    data, metadata = load_dataset(args.dataset, device)
    env_id, action_space = validate_env(args, data, metadata)
    obs_dim, action_dim = data["observations"].shape[1], data["actions"].shape[1]
    low = torch.tensor(action_space.low, dtype=torch.float32, device=device)
    high = torch.tensor(action_space.high, dtype=torch.float32, device=device)
    # The clamp covers dataset actions a hair outside the bounds, and those that --clip-actions lets in.
    data["actions"] = normalize_actions(data["actions"], low, high).clamp(-1.0, 1.0)

    run_dir = Path(args.resume) if checkpoint else make_run_dir(
        f"{env_id}__{args.exp_name}__{Path(args.dataset).stem}__{args.seed}__{int(time.time())}")
    if args.track:
        try:
            import wandb
        except ImportError:
            fail("--track needs wandb: pip install wandb")
        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, sync_tensorboard=True,
                   config=vars(args), name=run_dir.name, save_code=True)
    # purge_step drops what an interrupted run logged after its checkpoint, so a resumed curve has no doubles.
    writer = SummaryWriter(str(run_dir), purge_step=checkpoint["step"] + 1 if checkpoint else None)
    table = "\n".join(f"|{key}|{value}|" for key, value in vars(args).items())
    writer.add_text("hyperparameters", f"|param|value|\n|-|-|\n{table}")

    policy = BCQPolicy(obs_dim, action_dim, action_space.low, action_space.high, args.phi, args.vae_hidden_dim,
                       args.layer_norm)
    policy.to(device)
    acting = ActingPolicy(policy, args.act_samples)
    if args.normalize_observations:
        policy.obs_mean.copy_(data["observations"].mean(dim=0))
        policy.obs_std.copy_(data["observations"].std(dim=0) + 1e-3)
    data["observations"] = policy.normalize(data["observations"])
    data["next_observations"] = policy.normalize(data["next_observations"])
    target_actor, target_critic = copy.deepcopy(policy.actor), copy.deepcopy(policy.critic)
    target_parameters = [*target_actor.parameters(), *target_critic.parameters()]
    online_parameters = [*policy.actor.parameters(), *policy.critic.parameters()]
    vae_optimizer = torch.optim.Adam(policy.vae.parameters(), lr=args.learning_rate, fused=True)
    actor_optimizer = torch.optim.Adam(policy.actor.parameters(), lr=args.learning_rate, fused=True)
    critic_optimizer = torch.optim.Adam(policy.critic.parameters(), lr=args.learning_rate, fused=True)
    actor_parameters = list(policy.actor.parameters())
    num_transitions = len(data["rewards"])
    # All that a checkpoint holds, besides the RNGs.
    state = {"policy": policy, "target_actor": target_actor, "target_critic": target_critic,
             "vae_optimizer": vae_optimizer, "actor_optimizer": actor_optimizer, "critic_optimizer": critic_optimizer}
    first_step = 1
    evaluations = []
    eval_time = 0.0
    wall_time = 0.0
    if checkpoint:
        for name, part in state.items():
            part.load_state_dict(checkpoint["state"][name])
        set_rng_states(checkpoint["rng"])
        first_step = checkpoint["step"] + 1
        evaluations = checkpoint["evaluations"]
        eval_time, wall_time = checkpoint["eval_time_s"], checkpoint["wall_time_s"]
    print(f"{args.exp_name}: {num_transitions} transitions from {args.dataset}, evaluating on {env_id}, "
          f"run folder {run_dir}" + (f", resumed after step {first_step - 1}" if checkpoint else ""))

    start_time = time.time() - wall_time
    last_losses = {}
    last_print = time.time()
    signal.signal(signal.SIGINT, stop_after_this_step)
    for global_step in range(first_step, args.total_steps + 1):
        # ALGO LOGIC: training
        indices = torch.randint(num_transitions, (args.batch_size,), device=device)
        observations, actions, rewards = (data[key][indices] for key in ("observations", "actions", "rewards"))
        next_observations, terminations = data["next_observations"][indices], data["terminations"][indices]

        # VAE: reconstruction + 0.5 * KL (the author's weights), so that decode(s, z) samples the data's actions at s.
        reconstruction, mean, std = policy.vae(observations, actions)
        reconstruction_loss = F.mse_loss(reconstruction, actions)
        kl_loss = vae_kl(mean, std)
        vae_loss = reconstruction_loss + 0.5 * kl_loss
        vae_optimizer.zero_grad()
        vae_loss.backward()
        vae_optimizer.step()

        # Critics: both regress on the soft clipped double-Q target, a max over target_samples VAE actions per s',
        # each perturbed by the target actor and valued by the target critics (eq. 13).
        with torch.no_grad():
            repeated = torch.repeat_interleave(next_observations, args.target_samples, dim=0)
            next_q1, next_q2 = target_critic(repeated, target_actor(repeated, policy.vae.decode(repeated)))
            targets = bcq_target(rewards, terminations, next_q1.view(-1, args.target_samples),
                                 next_q2.view(-1, args.target_samples), args.gamma, args.lmbda)
        q1, q2 = policy.critic(observations, actions)
        critic_loss = F.mse_loss(q1, targets) + F.mse_loss(q2, targets)
        critic_optimizer.zero_grad()
        critic_loss.backward()
        critic_optimizer.step()

        # Actor: deterministic policy gradient of Q1 at perturbed VAE samples; the gradients go into the actor only.
        with torch.no_grad():
            sampled_actions = policy.vae.decode(observations)
        perturbed_actions = policy.actor(observations, sampled_actions)
        actor_loss = -policy.critic.q1(observations, perturbed_actions).mean()
        actor_optimizer.zero_grad()
        actor_loss.backward(inputs=actor_parameters)
        actor_optimizer.step()

        with torch.no_grad():
            # One fused lerp over all parameters: target <- target + tau * (online - target).
            torch._foreach_lerp_(target_parameters, online_parameters, args.tau)
        # ALGO LOGIC END

        evaluate_now = global_step % args.eval_freq == 0 or global_step == args.total_steps
        if global_step % args.log_freq == 0 or evaluate_now:
            # Checked here, not every step: reading a loss waits for it, and that costs updates per second.
            losses = {"vae_loss": vae_loss.item(), "reconstruction_loss": reconstruction_loss.item(),
                      "kl_loss": kl_loss.item(), "critic_loss": critic_loss.item(), "actor_loss": actor_loss.item()}
            if not np.isfinite(list(losses.values())).all():
                last = {name: round(value, 6) for name, value in last_losses.items()}
                fail(f"a loss became non-finite at gradient step {global_step} (checked every --log-freq steps): "
                     f"{losses}; last finite losses: {last}. Try a lower --learning-rate.")
            last_losses = losses
            for name, value in losses.items():
                writer.add_scalar(f"losses/{name}", value, global_step)
            writer.add_scalar("diagnostics/q_data", q1.mean().item(), global_step)
            writer.add_scalar("diagnostics/target", targets.mean().item(), global_step)
            writer.add_scalar("diagnostics/perturbation", (perturbed_actions - sampled_actions).abs().mean().item(),
                              global_step)
            sps = global_step / (time.time() - start_time - eval_time)
            writer.add_scalar("charts/SPS", sps, global_step)
            if time.time() - last_print > 60:  # a sign of life between evaluations, about once a minute
                print(f"step {global_step}/{args.total_steps}  critic_loss {critic_loss.item():.3f}  SPS {sps:.1f}",
                      flush=True)
                last_print = time.time()

        if evaluate_now:
            eval_start = time.time()
            video_folder = run_dir / "videos" if args.capture_video else None
            evaluation = {"step": global_step, **evaluate(acting, env_id, args.eval_episodes, args.seed, args.gamma,
                                                          device, metadata.get("reference_returns"), video_folder,
                                                          f"step{global_step}")}
            eval_time += time.time() - eval_start
            evaluation["wall_time_s"] = time.time() - start_time  # to this score, evaluations included
            evaluations.append(evaluation)
            writer.add_scalar("eval/episodic_return", evaluation["mean_return"], global_step)
            if evaluation["normalized_score"] is not None:
                writer.add_scalar("eval/normalized_score", evaluation["normalized_score"], global_step)
            for tag in ("q_initial", "discounted_return_initial"):
                writer.add_scalar(f"diagnostics/{tag}", evaluation[tag], global_step)
            print(f"step {global_step}/{args.total_steps}  return {evaluation['mean_return']:.1f} ± "
                  f"{evaluation['std_return']:.1f}  "
                  f"Q(s0) {evaluation['q_initial']:.1f} vs discounted return "
                  f"{evaluation['discounted_return_initial']:.1f}  critic_loss {critic_loss.item():.3f}  "
                  f"SPS {sps:.0f}  eval {time.time() - eval_start:.0f} s", flush=True)
        if (evaluations and evaluations[-1]["step"] == global_step) or stop_requested:
            wall_time = time.time() - start_time
            checkpoint = {"args": asdict(args), "step": global_step, "rng": rng_states(), "evaluations": evaluations,
                          "state": {name: part.state_dict() for name, part in state.items()},
                          "wall_time_s": wall_time, "eval_time_s": eval_time}
            write_atomically(run_dir / "checkpoint.pt", lambda path: torch.save(checkpoint, path))
        if stop_requested:
            break

    model_path = run_dir / f"{args.exp_name}.pt"
    if args.save_model:
        write_atomically(model_path, lambda path: torch.save(policy.state_dict(), path))
        # Not deterministic: the program draws the VAE's latents from torch's generator, so seed it to replay.
        export_policy(acting, obs_dim, run_dir / "policy.pt2", {
            "env_id": env_id, "algorithm": args.exp_name, "dataset": args.dataset, "step": global_step,
            "observation_shape": [obs_dim],
            "action_space": {"low": action_space.low.tolist(), "high": action_space.high.tolist()},
            "reference_returns": metadata.get("reference_returns"), "deterministic": False,
            "evaluation": {"episodes": args.eval_episodes, "seed": args.seed, "gamma": args.gamma}})
        print(f"model saved to {model_path}, acting policy to {run_dir / 'policy.pt2'}")
    final = evaluations[-1] if evaluations else {}
    summary = {
        "args": asdict(args), "status": "interrupted" if stop_requested else "finished", "env_id": env_id,
        "dataset": args.dataset, "run_dir": str(run_dir), "model_path": str(model_path) if args.save_model else None,
        "final_returns": final.get("returns"), "final_mean_return": final.get("mean_return"),
        "final_std_return": final.get("std_return"), "final_normalized_score": final.get("normalized_score"),
        "total_steps": args.total_steps, "steps_done": global_step, "wall_time_s": wall_time,
        "eval_time_s": eval_time, "updates_per_second": global_step / (wall_time - eval_time),
        "evaluations": evaluations, "device": str(device), "git_commit": git_commit(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "gymnasium": gym.__version__,
                     "numpy": np.__version__},
    }
    write_atomically(run_dir / "summary.json", lambda path: path.write_text(json.dumps(summary, indent=2)))
    writer.close()
    if stop_requested:
        print(f"interrupted after step {global_step} of {args.total_steps}; continue with:  python "
              f"{sys.argv[0]} --resume {run_dir}", file=sys.stderr)
        sys.exit(130)
    print(f"final return {final['mean_return']:.1f} ± {final['std_return']:.1f} over {args.eval_episodes} episodes; "
          f"{summary['updates_per_second']:.0f} updates/s, {wall_time:.0f} s.\nRun folder {run_dir} "
          f"(summary.json, TensorBoard events: tensorboard --logdir runs)")
