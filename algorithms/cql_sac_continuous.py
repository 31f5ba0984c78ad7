"""Offline CQL(H) on SAC for continuous actions: Kumar, Zhou, Tucker and Levine, 2020, "Conservative Q-Learning
for Offline Reinforcement Learning", https://arxiv.org/abs/2006.04779.

Soft Actor-Critic (a tanh-Gaussian actor, twin critics with Polyak-averaged targets, automatic entropy tuning)
trained on a fixed dataset over-estimates the actions the data never took, and its actor climbs straight to
them. CQL(H) adds to each critic's TD loss the regulariser of the paper's eq. 4,

    cql_alpha * ( E_s log sum_a exp Q(s, a)  -  E_{(s, a) ~ D} Q(s, a) ),

which pushes down a soft maximum of Q over all actions and pushes up Q of the data's actions, so that the critic
is a lower bound on the policy's value (theorem 3.2). The log-sum-exp over a continuous box is importance
sampled (appendix F, the official code's "min_q_version 3"): num_random actions per state of each of three kinds,
uniform in the box, from pi(.|s) and from pi(.|s'), each Q minus its log-density. --lagrange tunes cql_alpha
so that the gap stays at --target-action-gap (CQL-Lagrange, eq. 30). The actor first learns --bc-steps of
behaviour cloning (the official code's warm start). --cql-alpha 0 is plain offline SAC, the baseline.

    python algorithms/cql_sac_continuous.py --dataset datasets/Hopper-v5/expert.npz
    python algorithms/cql_sac_continuous.py --dataset datasets/Hopper-v5/expert.npz --cql-alpha 0   # offline SAC

Actions live in the normalised box [-1, 1]^d, mapped to the env's bounds only when acting; the uniform density
and the actor's log-probabilities are both taken in that box. Observations are standardised with the dataset's
mean and std (CORL's practice). The measurements behind each default are in results/ablations.md.
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
    """save nn.ModuleDict(actor=..., critic=...)'s state_dict to <run folder>/<exp_name>.pt and the acting function
    to policy.pt2"""
    dataset: str = "datasets/Hopper-v5/expert.npz"
    """dataset file (.npz) made by data_collection/collect_dataset.py"""
    env_id: Optional[str] = None
    """env to evaluate on; None: the dataset's env_id"""
    total_steps: int = 60_000
    """number of gradient steps (paper: 1M; 60k here: 1M is out of reach of one CPU core in an hour)"""
    eval_freq: int = 5_000
    """evaluate every this many gradient steps (and after the last one)"""
    eval_episodes: int = 10
    """episodes per evaluation, run together in a vector env"""
    threads: int = 1
    """torch CPU threads: 1 lets two runs share a 2-core machine without slowing each other down"""
    resume: Optional[str] = None
    """run folder to continue from its last checkpoint, with the flags it was started with"""
    clip_actions: bool = False
    """clip dataset actions outside the env's bounds into them, instead of refusing the dataset"""

    # CQL-SAC
    actor_lr: float = 3e-5
    """Adam learning rate of the actor (paper: 1e-4; 3e-5 here: CORL's, results/ablations.md)"""
    critic_lr: float = 3e-4
    """Adam learning rate of the critics"""
    alpha_lr: float = 3e-4
    """Adam learning rate of the entropy temperature and of cql_alpha under --lagrange"""
    target_entropy: Optional[float] = None
    """entropy the temperature tuning aims at; None: -action_dim (SAC's)"""
    batch_size: int = 256
    """transitions per gradient step"""
    gamma: float = 0.99
    """discount factor"""
    tau: float = 0.02
    """Polyak averaging rate of the target critics (paper: 0.005; 0.02 here: the critic settles 4x sooner)"""
    hidden_dim: int = 256
    """width of the hidden layers of the actor and the critics"""
    num_layers: int = 2
    """hidden layers of the actor and the critics (official code: 3; 2 here: half the cost per update)"""
    layer_norm: bool = False
    """LayerNorm before each hidden ReLU of the critics (ReBRAC's; Yue et al. 2023: it stops Q divergence)"""
    normalize_observations: bool = True
    """standardise observations with the dataset's mean and std, kept in the saved model (paper: raw; CORL's)"""
    cql_alpha: float = 20.0
    """weight of the conservative term; 0 gives plain offline SAC"""
    num_random: int = 10
    """sampled actions of each of the three kinds per state in the log-sum-exp"""
    cql_states: int = 32
    """states of the batch eq. 4 is estimated on (paper: all 256; 32 here: unbiased, 2.6x the updates/s)"""
    lagrange: bool = False
    """tune cql_alpha automatically to keep the conservative gap at --target-action-gap"""
    target_action_gap: float = 10.0
    """the gap (logsumexp Q - data Q) that --lagrange aims at"""
    bc_steps: int = 3_000
    """train the actor by behaviour cloning (max log-likelihood of the data actions) for this many first steps"""
    bc_actor_lr: float = 1e-3
    """Adam learning rate of the actor during the --bc-steps (then --actor-lr)"""
    log_freq: int = 100
    """gradient steps between loss logs"""


def fail(message: str) -> NoReturn:
    """Stop with one line on stderr and exit status 2, without a traceback."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def validate_args(args: Args) -> None:
    """Refuse flags that cannot make a run, before anything is written."""
    for name in ("total_steps", "eval_freq", "eval_episodes", "threads", "batch_size", "hidden_dim", "num_layers",
                 "log_freq", "num_random", "cql_states"):
        if getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    for name in ("seed", "bc_steps", "cql_alpha"):  # no behaviour cloning, and plain SAC, are meaningful settings
        if not 0 <= getattr(args, name) < math.inf:
            fail(f"--{name.replace('_', '-')} must be at least 0, got {getattr(args, name)}")
    for name in ("actor_lr", "critic_lr", "alpha_lr", "bc_actor_lr"):
        if not 0.0 < getattr(args, name) < math.inf:
            fail(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if not 0.0 < args.tau <= 1.0:
        fail(f"--tau must be in (0, 1], got {args.tau}")
    if not 0.0 <= args.gamma <= 1.0:
        fail(f"--gamma must be in [0, 1], got {args.gamma}")
    if args.cql_states > args.batch_size:
        fail(f"--cql-states must be at most --batch-size {args.batch_size}, got {args.cql_states}")


# ------------------------------------------------------------------------------------------------- dataset
def load_dataset(path: str, device: torch.device) -> tuple[dict[str, torch.Tensor], dict]:
    """The whole dataset as tensors on the device, so that a batch is one torch.randint and an index.
    Whatever is wrong with the file stops the run here, with one line that names it."""
    if not Path(path).is_file():
        env_id, policy = Path(path).parent.name or "Hopper-v5", Path(path).stem
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
        fail(f"{path} has discrete actions; this script needs continuous (Box) actions: "
             f"use algorithms/cql_discrete_lunarlander.py or algorithms/bcq_discrete.py")
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
    return {key: torch.tensor(arrays[key], dtype=torch.float32, device=device) for key in keys}, metadata


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
def mlp(input_dim: int, output_dim: int, hidden_dim: int, num_layers: int, layer_norm: bool = False) -> nn.Sequential:
    layers, width = [], input_dim
    for _ in range(num_layers):
        layers += [nn.Linear(width, hidden_dim), *([nn.LayerNorm(hidden_dim)] if layer_norm else []), nn.ReLU()]
        width = hidden_dim
    return nn.Sequential(*layers, nn.Linear(width, output_dim))


class ObservationNormalizer(nn.Module):
    """(s - mean) / std with the dataset's statistics, kept as buffers so that a saved network carries them."""

    def __init__(self, obs_dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(obs_dim))
        self.register_buffer("std", torch.ones(obs_dim))

    def forward(self, observations: torch.Tensor) -> torch.Tensor:
        return (observations - self.mean) / self.std


class TwinCritic(nn.Module):
    """Q1 and Q2, two independent networks; returns [2, ...batch] for observations [...batch, obs_dim] and actions."""

    def __init__(self, obs_dim: int, action_dim: int, hidden_dim: int, num_layers: int, layer_norm: bool = False):
        super().__init__()
        self.normalize = ObservationNormalizer(obs_dim)
        self.q1 = mlp(obs_dim + action_dim, 1, hidden_dim, num_layers, layer_norm)
        self.q2 = mlp(obs_dim + action_dim, 1, hidden_dim, num_layers, layer_norm)

    def forward(self, observations: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        inputs = torch.cat([self.normalize(observations), actions], dim=-1)
        return torch.stack([self.q1(inputs).squeeze(-1), self.q2(inputs).squeeze(-1)])


class TanhGaussianActor(nn.Module):
    """pi(a|s): a Gaussian squashed by tanh into the normalised action box [-1, 1]^d."""

    def __init__(self, obs_dim: int, action_dim: int, hidden_dim: int, num_layers: int):
        super().__init__()
        self.normalize = ObservationNormalizer(obs_dim)
        self.network = mlp(obs_dim, 2 * action_dim, hidden_dim, num_layers)

    def distribution(self, observations: torch.Tensor) -> torch.distributions.Normal:
        mean, log_std = self.network(self.normalize(observations)).chunk(2, dim=-1)
        return torch.distributions.Normal(mean, log_std.clamp(-5.0, 2.0).exp())

    def forward(self, observations: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A reparameterised sample and its log-probability (SAC's appendix C: the tanh change of variables)."""
        gaussian = self.distribution(observations)
        pre_tanh = gaussian.rsample()
        action = torch.tanh(pre_tanh)
        log_prob = gaussian.log_prob(pre_tanh).sum(-1) - tanh_log_jacobian(pre_tanh).sum(-1)
        return action, log_prob

    def log_prob(self, observations: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """log pi(a|s) of given actions in (-1, 1), for behaviour cloning."""
        pre_tanh = torch.atanh(actions.clamp(-1.0 + 1e-6, 1.0 - 1e-6))
        return self.distribution(observations).log_prob(pre_tanh).sum(-1) - tanh_log_jacobian(pre_tanh).sum(-1)

    def deterministic(self, observations: torch.Tensor) -> torch.Tensor:
        # tanh of the mean read off the network, not off a Normal: its argument checks cannot be torch.export-ed.
        return torch.tanh(self.network(self.normalize(observations)).chunk(2, dim=-1)[0])


# ------------------------------------------------------------------------------------------------- the maths
def normalize_actions(actions: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Env units [low, high] -> [-1, 1]."""
    return 2.0 * (actions - low) / (high - low) - 1.0


def unnormalize_actions(actions: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> env units [low, high]."""
    return low + 0.5 * (actions + 1.0) * (high - low)


def tanh_log_jacobian(pre_tanh: torch.Tensor) -> torch.Tensor:
    """log(1 - tanh(x)^2), written stably as 2 * (log 2 - x - softplus(-2x))."""
    return 2.0 * (math.log(2.0) - pre_tanh - F.softplus(-2.0 * pre_tanh))


def cql_conservative_gap(
    q_random: torch.Tensor, q_current: torch.Tensor, q_next: torch.Tensor,
    log_prob_current: torch.Tensor, log_prob_next: torch.Tensor, q_data: torch.Tensor, action_dim: int,
) -> torch.Tensor:
    """CQL(H)'s gap for one critic (eq. 4, importance-sampled): the mean over states of the logsumexp over the
    three kinds of sampled actions, each Q minus its log-density, minus the mean Q of the dataset's actions.

    q_random, q_current, q_next and the (detached) log_prob_*: [states, num_random]; q_data: [states], the same
    states, so that each state's push-down and push-up balance (both means then vary with the states' values
    together). Actions live in [-1, 1]^action_dim, where the uniform density is 0.5^action_dim."""
    log_uniform_density = action_dim * math.log(0.5)
    importance_weighted = torch.cat(
        [q_random - log_uniform_density, q_current - log_prob_current, q_next - log_prob_next], dim=1
    )
    return torch.logsumexp(importance_weighted, dim=1).mean() - q_data.mean()


def soft_target(
    rewards: torch.Tensor, terminations: torch.Tensor, next_q_target: torch.Tensor, gamma: float,
) -> torch.Tensor:
    """r + gamma * (1 - terminal) * min(Q1', Q2')(s', a') with a' ~ pi(.|s'). As in the official CQL code
    (deterministic backup), the entropy bonus is left out of the target."""
    return rewards + gamma * (1.0 - terminations) * next_q_target.min(dim=0).values


# ------------------------------------------------------------------------------------------------- evaluation
class ActingPolicy(nn.Module):
    """The acting function that evaluation plays and policy.pt2 holds: raw env observations in, env actions out.
    The env's action bounds are buffers, so that the exported program carries them."""

    def __init__(self, actor: TanhGaussianActor, low: torch.Tensor, high: torch.Tensor):
        super().__init__()
        self.actor = actor
        self.register_buffer("low", low)
        self.register_buffer("high", high)

    def forward(self, observations: torch.Tensor) -> torch.Tensor:
        return unnormalize_actions(self.actor.deterministic(observations), self.low, self.high)


def evaluate(acting: ActingPolicy, critic: TwinCritic, env_id: str, episodes: int, seed: int, gamma: float,
             device: torch.device, reference_returns: Optional[dict], video_folder: Optional[Path] = None,
             video_prefix: str = "eval") -> dict:
    """Episodes of the deterministic policy tanh(mean) batched in a vector env; returns the evaluation's record:
    mean_return, std_return, normalized_score, q_initial (min(Q1, Q2) at s0), discounted_return_initial, returns."""

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
    while running.any():
        with torch.no_grad():
            observation_tensor = torch.tensor(observations, dtype=torch.float32, device=device)
            actions = acting(observation_tensor)
            if q_initial is None:  # the critic takes actions in [-1, 1]^d, before the acting function scales them
                normalised_actions = acting.actor.deterministic(observation_tensor)
                q_initial = critic(observation_tensor, normalised_actions).min(dim=0).values.cpu().numpy()
        observations, rewards, terminations, truncations, _ = envs.step(actions.cpu().numpy())
        returns += np.where(running, rewards, 0.0)
        discounted_returns += np.where(running, discount * rewards, 0.0)
        discount *= gamma
        running &= ~(terminations | truncations)
    envs.close()
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

    actor = TanhGaussianActor(obs_dim, action_dim, args.hidden_dim, args.num_layers).to(device)
    critic = TwinCritic(obs_dim, action_dim, args.hidden_dim, args.num_layers, args.layer_norm).to(device)
    if args.normalize_observations:
        obs_mean, obs_std = data["observations"].mean(dim=0), data["observations"].std(dim=0) + 1e-3
        for normalizer in (actor.normalize, critic.normalize):
            normalizer.mean.copy_(obs_mean)
            normalizer.std.copy_(obs_std)
    acting = ActingPolicy(actor, low, high)
    target_critic = TwinCritic(obs_dim, action_dim, args.hidden_dim, args.num_layers, args.layer_norm).to(device)
    target_critic.load_state_dict(critic.state_dict())
    actor_optimizer = torch.optim.Adam(actor.parameters(), lr=args.bc_actor_lr if args.bc_steps > 0 else args.actor_lr)
    critic_optimizer = torch.optim.Adam(critic.parameters(), lr=args.critic_lr)
    # SAC's automatic entropy tuning (Haarnoja et al., 2018b): keep the policy's entropy near -action_dim.
    # Both learnable log-weights live in one module, so that a checkpoint holds them as it holds the networks.
    log_alphas = nn.ParameterDict({"entropy": torch.zeros(1, device=device),
                                   "cql": torch.tensor([math.log(max(args.cql_alpha, 1e-8))], device=device)})
    log_entropy_alpha, log_cql_alpha = log_alphas["entropy"], log_alphas["cql"]
    entropy_optimizer = torch.optim.Adam([log_entropy_alpha], lr=args.alpha_lr)
    target_entropy = -float(action_dim) if args.target_entropy is None else args.target_entropy
    cql_alpha_optimizer = torch.optim.Adam([log_cql_alpha], lr=args.alpha_lr)
    num_transitions = len(data["rewards"])
    repeats = args.num_random
    # All that a checkpoint holds, besides the RNGs; the actor's lr, switched at bc_steps, is in its optimizer's.
    state = {"actor": actor, "critic": critic, "target_critic": target_critic, "log_alphas": log_alphas,
             "actor_optimizer": actor_optimizer, "critic_optimizer": critic_optimizer,
             "entropy_optimizer": entropy_optimizer, "cql_alpha_optimizer": cql_alpha_optimizer}
    first_step = 1
    evaluations = []
    eval_time = 0.0
    wall_time = 0.0
    if checkpoint:
        for name, part in state.items():
            part.load_state_dict(checkpoint["state"][name])
        set_rng_states(checkpoint["rng"])
        first_step, evaluations = checkpoint["step"] + 1, checkpoint["evaluations"]
        eval_time, wall_time = checkpoint["eval_time_s"], checkpoint["wall_time_s"]
    print(f"{args.exp_name}: {num_transitions} transitions from {args.dataset}, evaluating on {env_id}, "
          f"run folder {run_dir}" + (f", resumed after step {first_step - 1}" if checkpoint else ""))

    start_time = time.time() - wall_time
    last_losses = {}
    last_print = time.time()
    signal.signal(signal.SIGINT, stop_after_this_step)
    for global_step in range(first_step, args.total_steps + 1):
        indices = torch.randint(num_transitions, (args.batch_size,), device=device)
        observations, actions = data["observations"][indices], data["actions"][indices]
        rewards, next_observations = data["rewards"][indices], data["next_observations"][indices]

        # ALGO LOGIC: training
        entropy_alpha = log_entropy_alpha.exp().detach()

        # Critics: TD loss (eq. 2 of SAC with CQL's deterministic backup) plus the conservative gap (eq. 4).
        with torch.no_grad():
            next_actions, _ = actor(next_observations)
            next_q_target = target_critic(next_observations, next_actions)
            targets = soft_target(rewards, data["terminations"][indices], next_q_target, args.gamma)
        q_data = critic(observations, actions)
        td_loss = ((q_data - targets) ** 2).mean(dim=1).sum()  # summed over the two critics
        if args.cql_alpha > 0 or args.lagrange:
            # The batch is drawn uniformly, so its first --cql-states rows are a uniform sample of states too: eq. 4
            # estimated on them is unbiased, at a fraction of the cost.
            states, next_states = observations[:args.cql_states], next_observations[:args.cql_states]
            with torch.no_grad():  # the sampled actions of the log-sum-exp: [states, num_random, action_dim] each
                random_actions = torch.empty(args.cql_states, repeats, action_dim, device=device).uniform_(-1.0, 1.0)
                current_actions, log_prob_current = actor(states.unsqueeze(1).expand(-1, repeats, -1))
                next_sampled_actions, log_prob_next = actor(next_states.unsqueeze(1).expand(-1, repeats, -1))
            sampled_actions = torch.cat([random_actions, current_actions, next_sampled_actions], dim=1)
            q_sampled = critic(states.unsqueeze(1).expand(-1, 3 * repeats, -1), sampled_actions)
            q_random, q_current, q_next = q_sampled.split(repeats, dim=2)
            gaps = torch.stack([cql_conservative_gap(q_random[i], q_current[i], q_next[i], log_prob_current,
                                                     log_prob_next, q_data[i, :args.cql_states], action_dim)
                                for i in range(2)])
        else:
            gaps = torch.zeros(2, device=device)
        if args.lagrange:
            # CQL-Lagrange (eq. 30): cql_alpha grows while the gap exceeds target_action_gap, and shrinks otherwise.
            cql_alpha = log_cql_alpha.exp().clamp(0.0, 1e6)
            cql_loss = (cql_alpha.detach() * (gaps - args.target_action_gap)).sum()
            cql_alpha_loss = -(cql_alpha * (gaps.detach() - args.target_action_gap)).sum()
            cql_alpha_optimizer.zero_grad()
            cql_alpha_loss.backward()
            cql_alpha_optimizer.step()
        else:
            cql_alpha = torch.tensor(args.cql_alpha)
            cql_loss = args.cql_alpha * gaps.sum()
        critic_loss = td_loss + cql_loss
        critic_optimizer.zero_grad()
        critic_loss.backward()
        critic_optimizer.step()

        # Actor: maximise min(Q1, Q2) plus entropy (SAC); behaviour cloning for the first bc_steps.
        if global_step == args.bc_steps + 1:
            for group in actor_optimizer.param_groups:
                group["lr"] = args.actor_lr
        policy_actions, log_prob = actor(observations)
        if global_step <= args.bc_steps:
            actor_loss = (entropy_alpha * log_prob - actor.log_prob(observations, actions)).mean()
        else:
            actor_loss = (entropy_alpha * log_prob - critic(observations, policy_actions).min(dim=0).values).mean()
        entropy_loss = -(log_entropy_alpha * (log_prob.detach() + target_entropy)).mean()
        actor_optimizer.zero_grad()
        actor_loss.backward(inputs=list(actor.parameters()))  # the critics' gradients are not needed
        actor_optimizer.step()
        entropy_optimizer.zero_grad()
        entropy_loss.backward()
        entropy_optimizer.step()
        with torch.no_grad():
            # One fused lerp over all parameters: target <- target + tau * (online - target).
            torch._foreach_lerp_(list(target_critic.parameters()), list(critic.parameters()), args.tau)
        # ALGO LOGIC END

        evaluate_now = global_step % args.eval_freq == 0 or global_step == args.total_steps
        if global_step % args.log_freq == 0 or evaluate_now:
            # Checked here, not every step: reading a loss waits for it, and that costs updates per second.
            losses = {"td_loss": td_loss.item(), "cql_loss": cql_loss.item(), "actor_loss": actor_loss.item()}
            if not np.isfinite(list(losses.values())).all():
                last = {name: round(value, 6) for name, value in last_losses.items()}
                fail(f"a loss became non-finite at gradient step {global_step} (checked every --log-freq steps): "
                     f"{losses}; last finite losses: {last}. Try a lower learning rate.")
            last_losses = losses
            for name, value in losses.items():
                writer.add_scalar(f"losses/{name}", value, global_step)
            writer.add_scalar("losses/entropy_alpha", entropy_alpha.item(), global_step)
            writer.add_scalar("losses/cql_alpha", cql_alpha.item(), global_step)
            writer.add_scalar("diagnostics/q_data", q_data.mean().item(), global_step)
            writer.add_scalar("diagnostics/conservative_gap", gaps.mean().item(), global_step)
            writer.add_scalar("diagnostics/policy_log_prob", log_prob.mean().item(), global_step)
            sps = global_step / (time.time() - start_time - eval_time)
            writer.add_scalar("charts/SPS", sps, global_step)
            if time.time() - last_print > 60:  # a sign of life between evaluations, about once a minute
                print(f"step {global_step}/{args.total_steps}  td_loss {td_loss.item():.3f}  SPS {sps:.1f}", flush=True)
                last_print = time.time()

        if evaluate_now:
            eval_start = time.time()
            video_folder = run_dir / "videos" if args.capture_video else None
            evaluation = {"step": global_step, **evaluate(acting, critic, env_id, args.eval_episodes, args.seed,
                                                          args.gamma, device, metadata.get("reference_returns"),
                                                          video_folder, f"step{global_step}")}
            eval_time += time.time() - eval_start
            evaluation["wall_time_s"] = time.time() - start_time  # to this score, evaluations included
            evaluations.append(evaluation)
            writer.add_scalar("eval/episodic_return", evaluation["mean_return"], global_step)
            if evaluation["normalized_score"] is not None:
                writer.add_scalar("eval/normalized_score", evaluation["normalized_score"], global_step)
            writer.add_scalar("diagnostics/q_initial", evaluation["q_initial"], global_step)
            writer.add_scalar("diagnostics/discounted_return_initial", evaluation["discounted_return_initial"],
                              global_step)
            print(f"step {global_step}/{args.total_steps}  return {evaluation['mean_return']:.1f} ± "
                  f"{evaluation['std_return']:.1f}  "
                  f"Q(s0) {evaluation['q_initial']:.1f} vs discounted return "
                  f"{evaluation['discounted_return_initial']:.1f}  td_loss {td_loss.item():.3f}  SPS {sps:.1f}",
                  flush=True)
        if evaluate_now or stop_requested:
            wall_time = time.time() - start_time
            checkpoint = {"args": asdict(args), "step": global_step, "rng": rng_states(), "evaluations": evaluations,
                          "state": {name: part.state_dict() for name, part in state.items()},
                          "wall_time_s": wall_time, "eval_time_s": eval_time}
            write_atomically(run_dir / "checkpoint.pt", lambda path: torch.save(checkpoint, path))
        if stop_requested:
            break

    model_path = run_dir / f"{args.exp_name}.pt"
    if args.save_model:
        model = nn.ModuleDict({"actor": actor, "critic": critic})  # one plain state_dict
        write_atomically(model_path, lambda path: torch.save(model.state_dict(), path))
        export_policy(acting, obs_dim, run_dir / "policy.pt2", {
            "env_id": env_id, "algorithm": args.exp_name, "dataset": args.dataset, "step": global_step,
            "observation_shape": [obs_dim],
            "action_space": {"low": action_space.low.tolist(), "high": action_space.high.tolist()},
            "reference_returns": metadata.get("reference_returns"), "deterministic": True,
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
          f"{summary['updates_per_second']:.1f} updates/s, {wall_time:.0f} s.\nRun folder {run_dir} "
          f"(summary.json, TensorBoard events: tensorboard --logdir runs)")
