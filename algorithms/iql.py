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
locomotion, ikostrikov/implicit_q_learning, except where a field says otherwise.
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
    """save actor, critic and value (one nn.ModuleDict's state_dict) to <run folder>/<exp_name>.pt, and policy.pt2"""
    dataset: str = "datasets/Hopper-v5/medium-expert.npz"
    """dataset file (.npz) made by data_collection/collect_dataset.py"""
    env_id: Optional[str] = None
    """env to evaluate on; None: the dataset's env_id"""
    total_steps: int = 200_000
    """number of gradient steps (paper: 1M; 200k here: 38 minutes on one CPU core, and still rising at 100k)"""
    eval_freq: int = 10_000
    """evaluate every this many gradient steps (and after the last one)"""
    eval_episodes: int = 10
    """episodes per evaluation, run together in a vector env"""
    threads: int = 1
    """torch CPU threads: 1 is fastest for these small networks and lets parallel runs share the cores"""
    resume: Optional[str] = None
    """run folder to continue from its last checkpoint, with the flags it was started with"""
    clip_actions: bool = False
    """clip dataset actions outside the env's bounds into them, instead of refusing the dataset"""

    # IQL
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
    log_freq: int = 100
    """gradient steps between loss logs"""


def fail(message: str) -> NoReturn:
    """Stop with one line on stderr and exit status 2, without a traceback."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def validate_args(args: Args) -> None:
    """Refuse flags that cannot make a run, before anything is written."""
    for name in ("total_steps", "eval_freq", "eval_episodes", "threads", "batch_size", "hidden_dim", "log_freq"):
        if getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.seed < 0:
        fail(f"--seed must be at least 0, got {args.seed}")
    if not 0.0 < args.learning_rate < math.inf:
        fail(f"--learning-rate must be positive, got {args.learning_rate}")
    if not 0.0 <= args.gamma <= 1.0:
        fail(f"--gamma must be in [0, 1], got {args.gamma}")
    if not 0.0 < args.tau <= 1.0:
        fail(f"--tau must be in (0, 1], got {args.tau}")
    if not 0.0 < args.expectile < 1.0:
        fail(f"--expectile must be in (0, 1), got {args.expectile}")
    if not args.beta >= 0.0:  # 0 is behaviour cloning
        fail(f"--beta must be at least 0, got {args.beta}")
    if not args.max_weight > 0.0:
        fail(f"--max-weight must be positive, got {args.max_weight}")


# ------------------------------------------------------------------------------------------------- dataset
def load_dataset(path: str, device: torch.device) -> tuple[dict[str, torch.Tensor], dict, np.ndarray]:
    """The dataset as tensors on the device (a batch is one torch.randint and an index), metadata, episode returns.
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
    discrete = arrays["actions"].ndim == 1 and arrays["actions"].dtype.kind in "iu"
    if not discrete and (arrays["actions"].ndim != 2 or arrays["actions"].dtype.kind != "f"):
        fail(f"{path}: actions are {arrays['actions'].dtype} {arrays['actions'].shape}; expected integers [N] "
             f"(Discrete) or floats [N, action_dim] (Box)")
    shapes = {key: arrays[key].shape for key in keys}
    n, obs_dim = shapes["observations"] if len(shapes["observations"]) == 2 else (0, 0)
    expected = {"observations": (n, obs_dim), "next_observations": (n, obs_dim), "rewards": (n,), "terminations": (n,),
                "actions": (n, *shapes["actions"][1:2])}
    if n == 0 or any(shapes[key] != expected[key] for key in keys):
        fail(f"{path}: the arrays' shapes {shapes} are not observations and next_observations [N, obs_dim], "
             f"actions [N] or [N, action_dim], rewards and terminations [N], with N at least 1")
    arrays.setdefault("episode_returns", np.zeros(0))  # optional: they set the reward scale
    for key in (*keys, "episode_returns"):
        if arrays[key].dtype.kind not in "fiub":  # terminations are booleans
            fail(f"{path}: {key} have dtype {arrays[key].dtype}, not numbers")
        if not np.isfinite(arrays[key]).all():
            fail(f"{path}: {key} hold {np.count_nonzero(~np.isfinite(arrays[key]))} NaN or infinite values; "
                 f"drop those transitions or collect the dataset again")
    # Only true terminations stop bootstrapping; a time-limit truncation still bootstraps.
    data = {key: torch.tensor(arrays[key], dtype=torch.float32, device=device)
            for key in ("observations", "rewards", "next_observations", "terminations")}
    data["actions"] = torch.tensor(arrays["actions"], dtype=torch.long if discrete else torch.float32, device=device)
    return data, metadata, arrays["episode_returns"]


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
    action_space, observation_shape = probe_env.action_space, probe_env.observation_space.shape
    probe_env.close()
    actions, obs_dim, discrete = data["actions"], data["observations"].shape[1], data["actions"].dtype == torch.long
    if not isinstance(action_space, gym.spaces.Discrete if discrete else gym.spaces.Box):
        kind = "discrete actions" if discrete else f"continuous actions of shape ({actions.shape[1]},)"
        fail(f"dataset {args.dataset} has {kind}, env {env_id} has actions {action_space}")
    described = metadata.get("action_space", {})
    if discrete:
        n_actions = described.get("n", int(actions.max()) + 1)
        if observation_shape != (obs_dim,) or n_actions != int(action_space.n):
            fail(f"dataset and env do not match: dataset {args.dataset} has obs_dim {obs_dim} and {n_actions} "
                 f"actions, env {env_id} has observation shape {observation_shape} and {action_space.n} actions")
        if actions.min() < 0 or actions.max() >= n_actions:
            fail(f"{args.dataset}: actions range over {int(actions.min())}..{int(actions.max())}, "
                 f"outside the env's 0..{n_actions - 1}")
        return env_id, action_space
    action_dim = actions.shape[1]
    bounds = f"[{action_space.low.tolist()}, {action_space.high.tolist()}]"
    data_low, data_high = (described.get(key, getattr(action_space, key).tolist()) for key in ("low", "high"))
    if (observation_shape != (obs_dim,) or action_space.shape != (action_dim,)
            or not np.allclose(data_low, action_space.low) or not np.allclose(data_high, action_space.high)):
        fail(f"dataset and env do not match: dataset {args.dataset} has obs_dim {obs_dim} and actions of shape "
             f"({action_dim},) in [{data_low}, {data_high}], env {env_id} has observation shape "
             f"{observation_shape} and actions of shape {action_space.shape} in {bounds}")
    if not (np.all(np.isfinite(action_space.low)) and np.all(np.isfinite(action_space.high))):
        fail(f"{env_id} has unbounded actions {action_space}; a tanh policy needs finite bounds")
    low, high = (torch.tensor(bound, dtype=torch.float32, device=actions.device)
                 for bound in (action_space.low, action_space.high))
    data_min, data_max = actions.min(dim=0).values, actions.max(dim=0).values
    if not args.clip_actions and ((data_min < low - 1e-4).any() or (data_max > high + 1e-4).any()):
        fail(f"{args.dataset}: actions range over [{data_min.tolist()}, {data_max.tolist()}], outside the env's "
             f"bounds {bounds}; --clip-actions clips them")
    return env_id, action_space


# ------------------------------------------------------------------------------------------------- networks
def mlp(input_dim: int, output_dim: int, hidden_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(input_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, hidden_dim), nn.ReLU(),
                         nn.Linear(hidden_dim, output_dim))


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


# ------------------------------------------------------------------------------------------------- the maths
def normalize_actions(actions: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Env units [low, high] -> [-1, 1]."""
    return 2.0 * (actions - low) / (high - low) - 1.0


def unnormalize_actions(actions: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> env units [low, high]."""
    return low + 0.5 * (actions + 1.0) * (high - low)


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


# ------------------------------------------------------------------------------------------------- evaluation
class ActingPolicy(nn.Module):
    """The acting function that evaluation plays and policy.pt2 holds: raw env observations in, env actions out."""

    def __init__(self, actor: Actor, low: torch.Tensor, high: torch.Tensor):
        super().__init__()
        self.actor = actor
        self.register_buffer("low", low)
        self.register_buffer("high", high)

    def forward(self, observations: torch.Tensor) -> torch.Tensor:
        actions = self.actor.deterministic(self.actor.normalize(observations))
        return actions if self.actor.discrete else unnormalize_actions(actions, self.low, self.high)


def evaluate(acting: ActingPolicy, critic: TwinCritic, env_id: str, episodes: int, seed: int, gamma: float,
             reward_scale: float, device: torch.device, reference_returns: Optional[dict],
             video_folder: Optional[Path] = None, video_prefix: str = "eval") -> dict:
    """Deterministic episodes in a vector env (Box actions mapped to [low, high]). Returns the evaluation's record:
    mean_return, std_return, normalized_score, q_initial (min(Q1, Q2) of the first states and actions, in the env's
    reward units), discounted_return_initial (both averaged over the episodes) and the episodes' returns."""

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
            if q_initial is None:  # the critic takes standardised observations and Box actions in [-1, 1]^d
                normalized = acting.actor.normalize(observation_tensor)
                q_initial = (torch.minimum(*critic(normalized, acting.actor.deterministic(normalized)))
                             / reward_scale).cpu().numpy()
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

    data, metadata, episode_returns = load_dataset(args.dataset, device)
    env_id, action_space = validate_env(args, data, metadata)
    obs_dim, discrete = data["observations"].shape[1], data["actions"].dtype == torch.long
    n_actions, action_dim = (int(action_space.n), 0) if discrete else (0, data["actions"].shape[1])
    if discrete:
        low, high = torch.zeros(0, device=device), torch.zeros(0, device=device)  # the acting function's buffers
    else:
        low = torch.tensor(action_space.low, dtype=torch.float32, device=device)
        high = torch.tensor(action_space.high, dtype=torch.float32, device=device)
        # The clamp covers actions a hair outside the bounds (and those --clip-actions lets through).
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

    actor = Actor(obs_dim, action_dim, n_actions, args.hidden_dim).to(device)
    critic = TwinCritic(obs_dim, action_dim, n_actions, args.hidden_dim).to(device)
    value = mlp(obs_dim, 1, args.hidden_dim).to(device)
    if args.normalize_observations:
        actor.obs_mean.copy_(data["observations"].mean(dim=0))
        actor.obs_std.copy_(data["observations"].std(dim=0) + 1e-3)
    # Standardised once here, so that an update spends nothing on it.
    data["observations"] = actor.normalize(data["observations"])
    data["next_observations"] = actor.normalize(data["next_observations"])
    return_range = float(np.ptp(episode_returns)) if args.normalize_rewards and len(episode_returns) > 1 else 0.0
    reward_scale = 1000.0 / return_range if return_range > 0 else 1.0
    data["rewards"] = data["rewards"] * reward_scale
    target_critic = copy.deepcopy(critic)
    acting = ActingPolicy(actor, low, high)
    # The three losses touch disjoint parameters (targets and advantages are detached), so one backward pass and one
    # Adam step over their sum update all three from the same parameters, at less cost; the authors' code updates V
    # first and uses the new V in the other two losses. Only the actor's group decays (cosine).
    groups = [{"params": module.parameters()} for module in (actor, critic, value)]
    optimizer = torch.optim.Adam(groups, lr=args.learning_rate, fused=True)
    decay = [lambda step: 0.5 * (1.0 + math.cos(math.pi * step / args.total_steps)), lambda _: 1.0, lambda _: 1.0]
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, decay)
    num_transitions = len(data["rewards"])
    # All that a checkpoint holds, besides the RNGs; the reward scale follows from the dataset.
    state = {"actor": actor, "critic": critic, "target_critic": target_critic, "value": value,
             "optimizer": optimizer, "schedule": schedule}
    first_step = checkpoint["step"] + 1 if checkpoint else 1
    evaluations = checkpoint["evaluations"] if checkpoint else []
    eval_time = checkpoint["eval_time_s"] if checkpoint else 0.0
    wall_time = checkpoint["wall_time_s"] if checkpoint else 0.0
    if checkpoint:
        for name, part in state.items():
            part.load_state_dict(checkpoint["state"][name])
        set_rng_states(checkpoint["rng"])
    resumed = f", resumed after step {first_step - 1}" if checkpoint else ""
    print(f"{args.exp_name}: {num_transitions} transitions from {args.dataset} (rewards x {reward_scale:.4g}), "
          f"evaluating on {env_id}, run folder {run_dir}{resumed}")

    start_time = time.time() - wall_time
    last_losses = {}
    signal.signal(signal.SIGINT, stop_after_this_step)
    for global_step in range(first_step, args.total_steps + 1):
        # ALGO LOGIC: training
        indices = torch.randint(num_transitions, (args.batch_size,), device=device)
        observations, actions, rewards, next_observations, terminations = (
            data[key][indices] for key in ("observations", "actions", "rewards", "next_observations", "terminations"))

        # Value (eq. 5): V(s) regresses on the target critics' Q of the data's action, towards its upper expectile.
        with torch.no_grad():
            target_q = torch.minimum(*target_critic(observations, actions))
            next_values = value(next_observations).squeeze(-1)
        advantages = target_q - value(observations).squeeze(-1)
        value_loss = expectile_loss(advantages, args.expectile)
        # Actor (eq. 7): advantage-weighted log-likelihood of the data's actions.
        weights = advantage_weights(advantages.detach(), args.beta, args.max_weight)
        actor_loss = -(weights * actor.log_prob(observations, actions)).mean()
        # Critics (eq. 6): both regress on r + gamma * V(s').
        targets = iql_target(rewards, terminations, next_values, args.gamma)
        q1, q2 = critic(observations, actions)
        critic_loss = F.mse_loss(q1, targets) + F.mse_loss(q2, targets)
        optimizer.zero_grad()
        (value_loss + actor_loss + critic_loss).backward()
        optimizer.step()
        schedule.step()
        with torch.no_grad():  # one fused lerp over all parameters: target <- target + tau * (online - target)
            torch._foreach_lerp_(list(target_critic.parameters()), list(critic.parameters()), args.tau)
        # ALGO LOGIC END

        evaluate_now = global_step % args.eval_freq == 0 or global_step == args.total_steps
        if global_step % args.log_freq == 0 or evaluate_now:
            # Checked here, not every step: reading a loss waits for it, and that costs updates per second.
            losses = dict(value_loss=value_loss.item(), actor_loss=actor_loss.item(), critic_loss=critic_loss.item())
            if not np.isfinite(list(losses.values())).all():
                fail(f"a loss became non-finite at gradient step {global_step} (checked every --log-freq steps): "
                     f"{losses}; last finite losses: {last_losses}. Try a lower --learning-rate.")
            last_losses = {name: round(loss, 6) for name, loss in losses.items()}
            for name, loss in losses.items():
                writer.add_scalar(f"losses/{name}", loss, global_step)
            writer.add_scalar("diagnostics/q_data", q1.mean().item() / reward_scale, global_step)
            writer.add_scalar("diagnostics/weight", weights.mean().item(), global_step)
            sps = global_step / (time.time() - start_time - eval_time)
            writer.add_scalar("charts/SPS", sps, global_step)

        if evaluate_now:
            eval_start = time.time()
            video_folder = run_dir / "videos" if args.capture_video else None
            evaluation = {"step": global_step, **evaluate(acting, critic, env_id, args.eval_episodes, args.seed,
                                                          args.gamma, reward_scale, device,
                                                          metadata.get("reference_returns"), video_folder,
                                                          f"step{global_step}")}
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
                  f"{evaluation['std_return']:.1f}  Q(s0) {evaluation['q_initial']:.1f} vs discounted return "
                  f"{evaluation['discounted_return_initial']:.1f}  SPS {sps:.0f}", flush=True)
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
        model = nn.ModuleDict({"actor": actor, "critic": critic, "value": value})
        write_atomically(model_path, lambda path: torch.save(model.state_dict(), path))
        export_policy(acting, obs_dim, run_dir / "policy.pt2", {
            "env_id": env_id, "algorithm": args.exp_name, "dataset": args.dataset, "step": global_step,
            "observation_shape": [obs_dim], "action_space": {"n": n_actions} if discrete else
            {"low": action_space.low.tolist(), "high": action_space.high.tolist()},
            "reference_returns": metadata.get("reference_returns"), "deterministic": True,
            "evaluation": {"episodes": args.eval_episodes, "seed": args.seed, "gamma": args.gamma}})
        print(f"model saved to {model_path}, acting policy to {run_dir / 'policy.pt2'}")
    final = evaluations[-1] if evaluations else {}
    summary = {
        "args": asdict(args), "status": "interrupted" if stop_requested else "finished", "env_id": env_id,
        "dataset": args.dataset, "run_dir": str(run_dir), "model_path": str(model_path) if args.save_model else None,
        "reward_scale": reward_scale,
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
