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
these are except where a field says otherwise. Continuous actions only.
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
    dataset: str = "datasets/Hopper-v5/medium-expert.npz"
    """dataset file (.npz) made by data_collection/collect_dataset.py"""
    env_id: Optional[str] = None
    """env to evaluate on; None: the dataset's env_id"""
    total_steps: int = 100_000
    """number of critic updates (paper: 1M; 100k here: 1M is 2.5 hours on a CPU core, results/speed_td3_bc_iql.md)"""
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

    # TD3+BC
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
    log_freq: int = 100
    """gradient steps between loss logs"""


def fail(message: str) -> NoReturn:
    """Stop with one line on stderr and exit status 2, without a traceback."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def validate_args(args: Args) -> None:
    """Refuse flags that cannot make a run, before anything is written."""
    for name in ("total_steps", "eval_freq", "eval_episodes", "threads", "batch_size", "hidden_dim", "policy_freq",
                 "log_freq"):
        if getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.seed < 0:
        fail(f"--seed must be at least 0, got {args.seed}")
    for name in ("actor_lr", "critic_lr"):
        if not 0.0 < getattr(args, name) < math.inf:
            fail(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if not 0.0 <= args.gamma <= 1.0:
        fail(f"--gamma must be in [0, 1], got {args.gamma}")
    if not 0.0 < args.tau <= 1.0:
        fail(f"--tau must be in (0, 1], got {args.tau}")
    for name in ("alpha", "policy_noise", "noise_clip"):  # alpha 0 is behaviour cloning, noise 0 no smoothing
        if not getattr(args, name) >= 0.0:
            fail(f"--{name.replace('_', '-')} must be at least 0, got {getattr(args, name)}")


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
        fail(f"{path} has discrete actions; this script needs continuous (Box) actions: use algorithms/iql.py, "
             f"algorithms/cql_discrete_lunarlander.py or algorithms/bcq_discrete.py")
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
def mlp(input_dim: int, output_dim: int, hidden_dim: int, layer_norm: bool = False) -> nn.Sequential:
    layers, width = [], input_dim
    for _ in range(2):
        layers += [nn.Linear(width, hidden_dim), *([nn.LayerNorm(hidden_dim)] if layer_norm else []), nn.ReLU()]
        width = hidden_dim
    return nn.Sequential(*layers, nn.Linear(width, output_dim))


def normalize_actions(actions: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Env units [low, high] -> [-1, 1]."""
    return 2.0 * (actions - low) / (high - low) - 1.0


def unnormalize_actions(actions: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> env units [low, high]."""
    return low + 0.5 * (actions + 1.0) * (high - low)


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


# ------------------------------------------------------------------------------------------------- the maths
def smoothed_target_actions(target_actions: torch.Tensor, noise: torch.Tensor, noise_clip: float) -> torch.Tensor:
    """TD3's target policy smoothing: pi'(s') + noise clipped to +-noise_clip, the sum clipped to the box [-1, 1]."""
    return (target_actions + noise.clamp(-noise_clip, noise_clip)).clamp(-1.0, 1.0)


def td3_target(rewards: torch.Tensor, terminations: torch.Tensor, next_q1: torch.Tensor, next_q2: torch.Tensor,
               gamma: float) -> torch.Tensor:
    """r + gamma * (1 - terminal) * min(Q1', Q2'): TD3's clipped double Q-learning."""
    return rewards + gamma * (1.0 - terminations) * torch.minimum(next_q1, next_q2)


def td3_bc_actor_loss(q_policy: torch.Tensor, policy_actions: torch.Tensor, data_actions: torch.Tensor,
                      alpha: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The paper's eq. 3 with eq. 4: -lambda * mean Q1(s, pi(s)) + mean (pi(s) - a)^2, lambda = alpha / mean |Q1|
    (a constant: its gradient is not taken). Returns the loss, lambda and the behaviour-cloning term."""
    lmbda = alpha / q_policy.abs().mean().detach()
    bc_term = F.mse_loss(policy_actions, data_actions)
    return -lmbda * q_policy.mean() + bc_term, lmbda, bc_term


# ------------------------------------------------------------------------------------------------- evaluation
def evaluate(acting: ActingPolicy, critic: TwinCritic, env_id: str, episodes: int, seed: int, gamma: float,
             device: torch.device, reference_returns: Optional[dict], video_folder: Optional[Path] = None,
             video_prefix: str = "eval") -> dict:
    """Deterministic episodes batched in a vector env. Returns the evaluation's record: mean and std of the returns,
    normalised score (None without references), mean first min(Q1, Q2), mean discounted return, the returns."""

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
            if q_initial is None:  # the critic takes standardised observations and actions in [-1, 1]^d
                normalized = acting.actor.normalize(observation_tensor)
                q_initial = torch.minimum(*critic(normalized, acting.actor(normalized))).cpu().numpy()
            actions = acting(observation_tensor).cpu().numpy()
        observations, rewards, terminations, truncations, _ = envs.step(actions)
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

    actor = Actor(obs_dim, action_dim, args.hidden_dim, action_space.low, action_space.high).to(device)
    critic = TwinCritic(obs_dim, action_dim, args.hidden_dim, args.layer_norm).to(device)
    if args.normalize_observations:
        actor.obs_mean.copy_(data["observations"].mean(dim=0))
        actor.obs_std.copy_(data["observations"].std(dim=0) + 1e-3)
    # Standardised once here, so an update spends nothing on it.
    data["observations"] = actor.normalize(data["observations"])
    data["next_observations"] = actor.normalize(data["next_observations"])
    target_actor, target_critic = copy.deepcopy(actor), copy.deepcopy(critic)
    acting = ActingPolicy(actor)
    target_parameters = [*target_actor.parameters(), *target_critic.parameters()]
    online_parameters = [*actor.parameters(), *critic.parameters()]
    actor_optimizer = torch.optim.Adam(actor.parameters(), lr=args.actor_lr, fused=True)
    critic_optimizer = torch.optim.Adam(critic.parameters(), lr=args.critic_lr, fused=True)
    num_transitions = len(data["rewards"])
    # All that a checkpoint holds, besides the RNGs; which steps update the actor follows from global_step.
    state = {"actor": actor, "critic": critic, "target_actor": target_actor, "target_critic": target_critic,
             "actor_optimizer": actor_optimizer, "critic_optimizer": critic_optimizer}
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
    # actor_loss stays None only where a resumed run reaches a log step before its first actor update.
    actor_loss = None
    signal.signal(signal.SIGINT, stop_after_this_step)
    for global_step in range(first_step, args.total_steps + 1):
        # ALGO LOGIC: training
        indices = torch.randint(num_transitions, (args.batch_size,), device=device)
        observations, actions, rewards = (data[key][indices] for key in ("observations", "actions", "rewards"))
        next_observations, terminations = data["next_observations"][indices], data["terminations"][indices]

        # Critics: clipped double Q with target policy smoothing.
        with torch.no_grad():
            noise = torch.randn_like(actions) * args.policy_noise
            next_actions = smoothed_target_actions(target_actor(next_observations), noise, args.noise_clip)
            targets = td3_target(rewards, terminations, *target_critic(next_observations, next_actions), args.gamma)
        q1, q2 = critic(observations, actions)
        critic_loss = F.mse_loss(q1, targets) + F.mse_loss(q2, targets)
        critic_optimizer.zero_grad()
        critic_loss.backward()
        critic_optimizer.step()

        # Delayed actor (eq. 3), from step 1 on: the gradient flows through Q1 into the actor only; the targets follow.
        if global_step % args.policy_freq == 1 % args.policy_freq:
            policy_actions = actor(observations)
            q_policy = critic.q1(torch.cat([observations, policy_actions], dim=-1)).squeeze(-1)
            actor_loss, lmbda, bc_term = td3_bc_actor_loss(q_policy, policy_actions, actions, args.alpha)
            actor_optimizer.zero_grad()
            actor_loss.backward(inputs=list(actor.parameters()))
            actor_optimizer.step()
            with torch.no_grad():
                # One fused lerp over all parameters: target <- target + tau * (online - target).
                torch._foreach_lerp_(target_parameters, online_parameters, args.tau)
        # ALGO LOGIC END

        evaluate_now = global_step % args.eval_freq == 0 or global_step == args.total_steps
        if global_step % args.log_freq == 0 or evaluate_now:
            # Checked here, not every step: reading a loss waits for it, and that costs updates per second.
            losses = {"critic_loss": critic_loss.item()}
            if actor_loss is not None:
                losses["actor_loss"] = actor_loss.item()
            if not np.isfinite(list(losses.values())).all():
                last = {name: round(value, 6) for name, value in last_losses.items()}
                fail(f"a loss became non-finite at gradient step {global_step} (checked every --log-freq steps): "
                     f"{losses}; last finite losses: {last}. Try a lower --critic-lr and --actor-lr.")
            last_losses = losses
            for name, value in losses.items():
                writer.add_scalar(f"losses/{name}", value, global_step)
            writer.add_scalar("diagnostics/q_data", q1.mean().item(), global_step)
            writer.add_scalar("diagnostics/target", targets.mean().item(), global_step)
            if actor_loss is not None:
                writer.add_scalar("diagnostics/lambda", lmbda.item(), global_step)
                writer.add_scalar("diagnostics/bc_mse", bc_term.item(), global_step)
            sps = global_step / (time.time() - start_time - eval_time)
            writer.add_scalar("charts/SPS", sps, global_step)

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
                  f"{evaluation['std_return']:.1f}  Q(s0) {evaluation['q_initial']:.1f} vs discounted return "
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
        model = nn.ModuleDict({"actor": actor, "critic": critic})
        write_atomically(model_path, lambda path: torch.save(model.state_dict(), path))
        export_policy(acting, obs_dim, run_dir / "policy.pt2", {
            "env_id": env_id, "algorithm": args.exp_name, "dataset": args.dataset, "step": global_step,
            "observation_shape": [obs_dim], "action_space": {"low": action_space.low.tolist(),
                                                                 "high": action_space.high.tolist()},
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
          f"{summary['updates_per_second']:.0f} updates/s, {wall_time:.0f} s.\nRun folder {run_dir} "
          f"(summary.json, TensorBoard events: tensorboard --logdir runs)")
