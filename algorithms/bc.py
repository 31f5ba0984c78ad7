"""Behaviour cloning (BC): the baseline of every offline RL table (Pomerleau, 1991; as in D4RL,
https://arxiv.org/abs/2004.07219, and CORL, https://arxiv.org/abs/2210.07105).

A policy network is fitted to the dataset's actions by supervised learning, with no value function and no
reward: it imitates whoever collected the data, so it can at best match them. Offline RL earns its place
where it beats this baseline, typically on noisy or mixed data, where imitation copies the mistakes too.

    Discrete:                  L = -mean_batch log softmax(f(s))[a]                 acts by argmax f(s)
    Box, --box-loss mse:       L = mean_batch (tanh(f(s)) - a)^2                     acts by tanh(f(s))
    Box, --box-loss gaussian:  L = -mean_batch log pi(a|s), pi = tanh(N(mu, sigma))  acts by tanh(mu(s))

Box actions live in the normalised box [-1, 1]^d, mapped to the env's bounds when acting. The log-likelihood of
a tanh-squashed Gaussian is the change of variables of SAC's appendix C (https://arxiv.org/abs/1801.01290,
eq. 21): log pi(a|s) = log N(u; mu, sigma) - sum_i log(1 - tanh(u_i)^2), u = atanh(a).

    python algorithms/bc.py --dataset datasets/LunarLander-v3/expert.npz
    python algorithms/bc.py --dataset datasets/Hopper-v5/expert.npz

Observations are standardised with the dataset's mean and std (kept in the saved model). Evaluation follows the
other scripts: episodes with seeds seed * 1000 + i, batched in a vector env, and the logged
diagnostics/discounted_return_initial, for comparison with their Q-values (BC has none to log).
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
from typing import Callable, Literal, NoReturn, Optional

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
    """save the policy's state_dict to <run folder>/<exp_name>.pt and its acting function to policy.pt2"""
    dataset: str = "datasets/LunarLander-v3/expert.npz"
    """dataset file (.npz) made by data_collection/collect_dataset.py"""
    env_id: Optional[str] = None
    """env to evaluate on; None: the dataset's env_id"""
    total_steps: int = 50_000
    """number of gradient steps (CORL: 1M; 50k here, 2-4 minutes: later steps did not add, results/ablations.md)"""
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

    # behaviour cloning
    learning_rate: float = 1e-3
    """Adam learning rate"""
    batch_size: int = 256
    """transitions per gradient step"""
    hidden_dim: int = 256
    """width of the policy's hidden layers"""
    num_layers: int = 2
    """hidden layers of the policy"""
    box_loss: Literal["gaussian", "mse"] = "mse"
    """Box actions: MSE of tanh(network) (CORL's), or NLL of a tanh-Gaussian (it swung from 10% to 100% of another
    agent's BipedalWalker data, results/ablations.md)"""
    gamma: float = 0.99
    """discount of the logged discounted return of the evaluation episodes (BC itself does not use it)"""
    log_freq: int = 100
    """gradient steps between loss logs"""


def fail(message: str) -> NoReturn:
    """Stop with one line on stderr and exit status 2, without a traceback."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def validate_args(args: Args) -> None:
    """Refuse flags that cannot make a run, before anything is written."""
    for name in ("total_steps", "eval_freq", "eval_episodes", "threads", "batch_size", "hidden_dim", "num_layers",
                 "log_freq"):
        if getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.seed < 0:
        fail(f"--seed must be at least 0, got {args.seed}")
    if not 0.0 < args.learning_rate < math.inf:
        fail(f"--learning-rate must be positive, got {args.learning_rate}")
    if not 0.0 <= args.gamma <= 1.0:
        fail(f"--gamma must be in [0, 1], got {args.gamma}")


# ------------------------------------------------------------------------------------------------- dataset
def load_dataset(path: str, device: torch.device) -> tuple[dict[str, torch.Tensor], dict]:
    """Observations and actions as tensors on the device, so that a batch is one torch.randint and an index.
    Whatever is wrong with the file stops the run here, with one line that names it."""
    if not Path(path).is_file():
        env_id = Path(path).parent.name or "LunarLander-v3"
        policy = Path(path).stem
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
    keys = ("observations", "actions")
    missing = [key for key in keys if key not in arrays]
    if missing or not isinstance(metadata, dict):
        fail(f"{path} is not a dataset of data_collection/collect_dataset.py: "
             + (f"it lacks {', '.join(missing)}" if missing else "its metadata is not a JSON object"))
    actions = arrays["actions"]
    discrete = actions.ndim == 1 and actions.dtype.kind in "iu"
    if not discrete and (actions.ndim != 2 or actions.dtype.kind != "f"):
        fail(f"{path}: actions are {actions.dtype} {actions.shape}; expected integers [N] "
             f"(Discrete) or floats [N, action_dim] (Box)")
    shapes = {key: arrays[key].shape for key in keys}
    n = shapes["observations"][0] if len(shapes["observations"]) == 2 else 0
    if n == 0 or shapes["actions"][0] != n:
        fail(f"{path}: the arrays' shapes {shapes} are not observations and next_observations [N, obs_dim], "
             f"actions [N] or [N, action_dim], rewards and terminations [N], with N at least 1")
    for key in keys:
        if arrays[key].dtype.kind not in "fiub":  # terminations are booleans
            fail(f"{path}: {key} have dtype {arrays[key].dtype}, not numbers")
        if not np.isfinite(arrays[key]).all():
            fail(f"{path}: {key} hold {np.count_nonzero(~np.isfinite(arrays[key]))} NaN or infinite values; "
                 f"drop those transitions or collect the dataset again")
    return {"observations": torch.tensor(arrays["observations"], dtype=torch.float32, device=device),
            "actions": torch.tensor(actions, dtype=torch.long if discrete else torch.float32, device=device)}, metadata


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
class Policy(nn.Module):
    """An MLP on standardised observations: logits (Discrete), tanh(output) (Box, mse) or mean and log-std
    of a Gaussian squashed by tanh (Box, gaussian)."""

    def __init__(self, obs_dim: int, output_dim: int, hidden_dim: int, num_layers: int):
        super().__init__()
        self.register_buffer("obs_mean", torch.zeros(obs_dim))
        self.register_buffer("obs_std", torch.ones(obs_dim))
        layers, width = [], obs_dim
        for _ in range(num_layers):
            layers += [nn.Linear(width, hidden_dim), nn.ReLU()]
            width = hidden_dim
        self.network = nn.Sequential(*layers, nn.Linear(width, output_dim))

    def forward(self, observations: torch.Tensor) -> torch.Tensor:
        return self.network((observations - self.obs_mean) / self.obs_std)


# ------------------------------------------------------------------------------------------------- the maths
def normalize_actions(actions: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Env units [low, high] -> [-1, 1]."""
    return 2.0 * (actions - low) / (high - low) - 1.0


def unnormalize_actions(actions: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> env units [low, high]."""
    return low + 0.5 * (actions + 1.0) * (high - low)


def tanh_gaussian_nll(output: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """-log pi(a|s) of actions in (-1, 1) for pi = tanh(N(mean, std)), output = [mean, log_std], averaged over
    the batch: the Gaussian density of atanh(a) minus log(1 - a^2), the tanh change of variables (SAC eq. 21)."""
    mean, log_std = output.chunk(2, dim=-1)
    pre_tanh = torch.atanh(actions.clamp(-1.0 + 1e-6, 1.0 - 1e-6))
    log_std = log_std.clamp(-5.0, 2.0)
    log_prob = -0.5 * ((pre_tanh - mean) / log_std.exp()) ** 2 - log_std - 0.5 * math.log(2.0 * math.pi)
    log_jacobian = 2.0 * (math.log(2.0) - pre_tanh - F.softplus(-2.0 * pre_tanh))  # log(1 - tanh(x)^2), stably
    return -(log_prob - log_jacobian).sum(dim=-1).mean()


def bc_loss(output: torch.Tensor, actions: torch.Tensor, discrete: bool, box_loss: str) -> torch.Tensor:
    """The imitation loss of one batch: cross-entropy, mean squared error of tanh(output), or tanh-Gaussian NLL."""
    if discrete:
        return F.cross_entropy(output, actions)
    if box_loss == "mse":
        return F.mse_loss(torch.tanh(output), actions)
    return tanh_gaussian_nll(output, actions)


def deterministic_action(output: torch.Tensor, discrete: bool, gaussian: bool) -> torch.Tensor:
    """The action the policy takes: argmax of the logits, or tanh of the output (of the mean, for gaussian)."""
    if discrete:
        return output.argmax(dim=-1)
    return torch.tanh(output.chunk(2, dim=-1)[0] if gaussian else output)


# ------------------------------------------------------------------------------------------------- evaluation
class ActingPolicy(nn.Module):
    """The acting function that evaluation plays and policy.pt2 holds: raw env observations in, env actions out."""

    def __init__(self, policy: Policy, discrete: bool, gaussian: bool, low: torch.Tensor, high: torch.Tensor):
        super().__init__()
        self.policy = policy
        self.discrete = discrete
        self.gaussian = gaussian
        self.register_buffer("low", low)
        self.register_buffer("high", high)

    def forward(self, observations: torch.Tensor) -> torch.Tensor:
        actions = deterministic_action(self.policy(observations), self.discrete, self.gaussian)
        return actions if self.discrete else unnormalize_actions(actions, self.low, self.high)


def evaluate(acting: nn.Module, env_id: str, episodes: int, seed: int, gamma: float, device: torch.device,
             reference_returns: Optional[dict], video_folder: Optional[Path] = None,
             video_prefix: str = "eval") -> dict:
    """Deterministic episodes batched in a vector env; returns the evaluation's record: mean_return, std_return,
    normalized_score (None without reference returns), discounted_return_initial and the episodes' returns."""

    def make_env(index: int) -> gym.Env:
        if video_folder is None or index > 0:
            return gym.make(env_id)
        return gym.wrappers.RecordVideo(gym.make(env_id, render_mode="rgb_array"), str(video_folder),
                                        episode_trigger=lambda episode: episode == 0, name_prefix=video_prefix,
                                        disable_logger=True)

    envs = gym.vector.SyncVectorEnv([lambda i=i: make_env(i) for i in range(episodes)],
                                    autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
    observations, _ = envs.reset(seed=[seed * 1000 + i for i in range(episodes)])
    returns, discounted_returns = np.zeros(episodes), np.zeros(episodes)
    running = np.ones(episodes, dtype=bool)
    discount = 1.0
    while running.any():
        with torch.no_grad():
            actions = acting(torch.tensor(observations, dtype=torch.float32, device=device))
        observations, rewards, terminations, truncations, _ = envs.step(actions.cpu().numpy())
        returns += np.where(running, rewards, 0.0)
        discounted_returns += np.where(running, discount * rewards, 0.0)
        discount *= gamma
        running &= ~(terminations | truncations)
    envs.close()
    mean_return = float(returns.mean())
    return {"mean_return": mean_return, "std_return": float(returns.std()),
            "normalized_score": normalized_score(mean_return, reference_returns),
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
    obs_dim, discrete = data["observations"].shape[1], data["actions"].dtype == torch.long
    if discrete:
        output_dim = int(action_space.n)
        low, high = torch.zeros(0, device=device), torch.zeros(0, device=device)  # the acting function's buffers
    else:
        output_dim = data["actions"].shape[1] * (2 if args.box_loss == "gaussian" else 1)
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

    policy = Policy(obs_dim, output_dim, args.hidden_dim, args.num_layers).to(device)
    policy.obs_mean.copy_(data["observations"].mean(dim=0))
    policy.obs_std.copy_(data["observations"].std(dim=0) + 1e-3)
    optimizer = torch.optim.Adam(policy.parameters(), lr=args.learning_rate, fused=True)
    gaussian = not discrete and args.box_loss == "gaussian"
    acting = ActingPolicy(policy, discrete, gaussian, low, high)
    num_transitions = len(data["actions"])
    state = {"policy": policy, "optimizer": optimizer}  # all that a checkpoint holds, besides the RNGs
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
          f"run folder {run_dir}" + (f" (resumed after step {first_step - 1})" if checkpoint else ""))

    start_time = time.time() - wall_time
    last_loss = "none yet"
    signal.signal(signal.SIGINT, stop_after_this_step)
    for global_step in range(first_step, args.total_steps + 1):
        # ALGO LOGIC: training
        indices = torch.randint(num_transitions, (args.batch_size,), device=device)
        observations = data["observations"][indices]
        actions = data["actions"][indices]
        output = policy(observations)
        loss = bc_loss(output, actions, discrete, args.box_loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        # ALGO LOGIC END

        evaluate_now = global_step % args.eval_freq == 0 or global_step == args.total_steps
        if global_step % args.log_freq == 0 or evaluate_now:
            sps = global_step / (time.time() - start_time - eval_time)
            writer.add_scalar("charts/SPS", sps, global_step)
        if global_step % args.log_freq == 0:
            # Checked here, not every step: reading a loss waits for it, and that costs updates per second.
            loss_value = loss.item()
            if not np.isfinite(loss_value):
                fail(f"the loss became {loss_value} at gradient step {global_step} (checked every --log-freq steps); "
                     f"last finite losses: {last_loss}. Try a lower --learning-rate.")
            last_loss = round(loss_value, 6)
            writer.add_scalar("losses/bc_loss", loss_value, global_step)
            with torch.no_grad():
                predicted = deterministic_action(output, discrete, gaussian)
                if discrete:
                    writer.add_scalar("diagnostics/accuracy", (predicted == actions).float().mean().item(), global_step)
                else:
                    writer.add_scalar("diagnostics/action_mse", F.mse_loss(predicted, actions).item(), global_step)

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
            writer.add_scalar("diagnostics/discounted_return_initial", evaluation["discounted_return_initial"],
                              global_step)
            print(f"step {global_step}/{args.total_steps}  return {evaluation['mean_return']:.1f} ± "
                  f"{evaluation['std_return']:.1f}  bc_loss {loss.item():.4f}  SPS {sps:.0f}", flush=True)
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
        write_atomically(model_path, lambda path: torch.save(policy.state_dict(), path))
        export_policy(acting, obs_dim, run_dir / "policy.pt2", {
            "env_id": env_id, "algorithm": args.exp_name, "dataset": args.dataset, "step": global_step,
            "observation_shape": [obs_dim], "action_space": {"n": int(action_space.n)} if discrete else
            {"low": action_space.low.tolist(), "high": action_space.high.tolist()},
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
