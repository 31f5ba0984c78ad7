"""Discrete BCQ, offline (Fujimoto et al., 2019, "Benchmarking Batch Deep Reinforcement Learning Algorithms",
https://arxiv.org/abs/1910.01708).

Offline Q-learning goes wrong where the max in its target picks actions that the dataset never took: their
values are never corrected, only over-estimated. Batch-Constrained Q-learning keeps the max to actions the
data supports. Beside the Q-network it trains an imitation network G(a|s) (behaviour cloning, cross-entropy)
and allows only the actions whose relative probability passes a threshold (the paper's section 4):

    allowed(s) = { a : G(a|s) / max_a' G(a'|s) >= threshold }
    target     = r + gamma * (1 - terminal) * Q_target(s', argmax_{a in allowed(s')} Q(s', a))

The agent acts with the same rule: argmax of Q over the allowed actions. The loss is the Huber TD loss plus
the imitation cross-entropy plus 1e-2 * mean(logits ** 2), which keeps the imitation logits from growing
without bound. `--threshold 0` allows every action: plain (Double) DQN. A threshold near 1 allows only the
most likely action: behaviour cloning.

    python algorithms/bcq_discrete.py --dataset datasets/LunarLander-v3/expert.npz

Defaults follow the author's code for non-Atari tasks (sfujim/BCQ, discrete_BCQ): separate Q and imitation
trunks of 256-256, Polyak target updates (tau 0.005) after every step, Adam 3e-4, batch 64, threshold 0.3.
The measured returns, and why d3rlpy's DiscreteBCQ collapses where this script does not, are in results/.
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
    """save the Q-network's and imitation network's state_dict to <run folder>/<exp_name>.pt and the acting function
    to policy.pt2"""
    dataset: str = "datasets/LunarLander-v3/expert.npz"
    """dataset file (.npz) made by data_collection/collect_dataset.py"""
    env_id: Optional[str] = None
    """env to evaluate on; None: the dataset's env_id"""
    total_steps: int = 50_000
    """number of gradient steps"""
    eval_freq: int = 5_000
    """evaluate every this many gradient steps (and after the last one)"""
    eval_episodes: int = 10
    """episodes per evaluation, run together in a vector env"""
    threads: int = 1
    """torch CPU threads: 1 is fastest for these small networks and lets parallel runs share the cores"""
    resume: Optional[str] = None
    """run folder to continue from its last checkpoint, with the flags it was started with"""

    # discrete BCQ
    learning_rate: float = 3e-4
    """Adam learning rate"""
    batch_size: int = 64
    """transitions per gradient step"""
    gamma: float = 0.99
    """discount factor"""
    threshold: float = 0.3
    """allowed actions have G(a|s) / max_a G(a|s) >= threshold; 0 is plain DQN, near 1 is behaviour cloning
    (author's code: strictly above the threshold; at or above here, so that 1.0 still allows the likeliest action)"""
    hidden_dim: int = 256
    """width of the two hidden layers of the Q and imitation networks (separate, as in the author's code)"""
    logit_penalty: float = 1e-2
    """weight of mean(imitation logits ** 2) in the loss"""
    tau: float = 0.005
    """target network update rate: target <- target + tau * (online - target); 1.0 is a hard copy"""
    target_network_frequency: int = 1
    """gradient steps between target network updates"""
    log_freq: int = 100
    """gradient steps between loss logs"""


def fail(message: str) -> NoReturn:
    """Stop with one line on stderr and exit status 2, without a traceback."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def validate_args(args: Args) -> None:
    """Refuse flags that cannot make a run, before anything is written."""
    for name in ("total_steps", "eval_freq", "eval_episodes", "threads", "batch_size", "hidden_dim", "log_freq",
                 "target_network_frequency"):
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
    if not 0.0 <= args.threshold <= 1.0:
        fail(f"--threshold must be in [0, 1], got {args.threshold}")
    if not 0.0 <= args.logit_penalty < math.inf:
        fail(f"--logit-penalty must be at least 0, got {args.logit_penalty}")


# ------------------------------------------------------------------------------------------------- dataset
def load_dataset(path: str, device: torch.device) -> tuple[dict[str, torch.Tensor], dict]:
    """The whole dataset as tensors on the device, so that a batch is one torch.randint and an index.
    Whatever is wrong with the file stops the run here, with one line that names it."""
    if not Path(path).is_file():
        env_id, policy = Path(path).parent.name or "LunarLander-v3", Path(path).stem
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
    keys = ("observations", "next_observations", "actions", "rewards", "terminations")
    missing = [key for key in keys if key not in arrays]
    if missing or not isinstance(metadata, dict):
        fail(f"{path} is not a dataset of data_collection/collect_dataset.py: "
             + (f"it lacks {', '.join(missing)}" if missing else "its metadata is not a JSON object"))
    if arrays["actions"].ndim != 1 or arrays["actions"].dtype.kind not in "iu":
        fail(f"{path} has continuous (Box) actions of shape {arrays['actions'].shape[1:]}; this script needs "
             f"discrete actions: use algorithms/cql_sac_continuous.py or algorithms/bcq_continuous.py")
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
    data = {key: torch.tensor(arrays[key], dtype=torch.long if key == "actions" else torch.float32, device=device)
            for key in keys}
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
    if not isinstance(probe_env.action_space, gym.spaces.Discrete):
        fail(f"{env_id} has actions {probe_env.action_space}; this script needs a Discrete action space")
    obs_dim, n_actions = data["observations"].shape[1], int(probe_env.action_space.n)
    dataset_actions = metadata.get("action_space", {}).get("n", int(data["actions"].max()) + 1)
    if probe_env.observation_space.shape != (obs_dim,) or dataset_actions != n_actions:
        fail(f"dataset and env do not match: dataset {args.dataset} has obs_dim {obs_dim} and {dataset_actions} "
             f"actions, env {env_id} has observation shape {probe_env.observation_space.shape} and {n_actions} actions")
    if data["actions"].min() < 0 or data["actions"].max() >= n_actions:
        fail(f"{args.dataset}: actions range over {int(data['actions'].min())}..{int(data['actions'].max())}, "
             f"outside the env's 0..{n_actions - 1}")
    probe_env.close()
    return env_id, probe_env.action_space


# ------------------------------------------------------------------------------------------------- networks
def mlp(input_dim: int, hidden_dim: int) -> nn.Sequential:
    """Two hidden layers with ReLU: the trunk that a linear head reads."""
    return nn.Sequential(nn.Linear(input_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, hidden_dim), nn.ReLU())


class BCQNetwork(nn.Module):
    """The Q-network and the imitation network G(a|s), in one module so that one target copy serves both."""

    def __init__(self, obs_dim: int, n_actions: int, hidden_dim: int):
        super().__init__()
        self.q_trunk = mlp(obs_dim, hidden_dim)
        self.imitation_trunk = mlp(obs_dim, hidden_dim)
        self.q_head = nn.Linear(hidden_dim, n_actions)
        self.imitation_head = nn.Linear(hidden_dim, n_actions)

    def forward(self, observations: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Q-values and imitation logits, each [batch, n_actions]."""
        return self.q_values(observations), self.imitation_head(self.imitation_trunk(observations))

    def q_values(self, observations: torch.Tensor) -> torch.Tensor:
        return self.q_head(self.q_trunk(observations))


class ActingPolicy(nn.Module):
    """The acting function that evaluation plays and policy.pt2 holds: raw env observations in, env actions out."""

    def __init__(self, network: BCQNetwork, threshold: float):
        super().__init__()
        self.network = network
        self.threshold = threshold

    def forward(self, observations: torch.Tensor) -> torch.Tensor:
        q_values, imitation_logits = self.network(observations)
        return masked_greedy(q_values, allowed_actions(imitation_logits, self.threshold))[1]


# ------------------------------------------------------------------------------------------------- the maths
def allowed_actions(imitation_logits: torch.Tensor, threshold: float) -> torch.Tensor:
    """Mask of the actions with G(a|s) / max_a' G(a'|s) >= threshold. The ratio of softmax probabilities is
    exp(logit - max logit), so no normalisation is needed; the most likely action is always allowed."""
    relative_probability = (imitation_logits - imitation_logits.max(dim=1, keepdim=True).values).exp()
    return relative_probability >= threshold


def masked_greedy(q_values: torch.Tensor, allowed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The allowed action with the highest Q, and that Q."""
    return q_values.masked_fill(~allowed, float("-inf")).max(dim=1)


def bcq_target(
    rewards: torch.Tensor, terminations: torch.Tensor, next_q_online: torch.Tensor, next_q_target: torch.Tensor,
    next_imitation_logits: torch.Tensor, gamma: float, threshold: float,
) -> torch.Tensor:
    """r + gamma * (1 - terminal) * Q_target(s', a'), with a' the online network's best allowed action."""
    _, next_actions = masked_greedy(next_q_online, allowed_actions(next_imitation_logits, threshold))
    next_value = next_q_target.gather(1, next_actions.unsqueeze(1)).squeeze(1)
    return rewards + gamma * (1.0 - terminations) * next_value


# ------------------------------------------------------------------------------------------------- evaluation
def evaluate(acting: ActingPolicy, env_id: str, episodes: int, seed: int, gamma: float, device: torch.device,
             reference_returns: Optional[dict], video_folder: Optional[Path] = None,
             video_prefix: str = "eval") -> dict:
    """Episodes of the BCQ policy (best allowed action) batched in a vector env; returns the evaluation's record:
    mean_return, std_return, normalized_score, q_initial (best allowed Q at s0), discounted_return_initial, returns."""

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
    acting.eval()
    while running.any():
        with torch.no_grad():
            observation_tensor = torch.tensor(observations, dtype=torch.float32, device=device)
            actions = acting(observation_tensor)
            if q_initial is None:  # the Q of the chosen action is the max of Q over the allowed ones
                q_values = acting.network.q_values(observation_tensor)
                q_initial = q_values.gather(1, actions.unsqueeze(1)).squeeze(1).cpu().numpy()
        observations, rewards, terminations, truncations, _ = envs.step(actions.cpu().numpy())
        returns += np.where(running, rewards, 0.0)
        discounted_returns += np.where(running, discount * rewards, 0.0)
        discount *= gamma
        running &= ~(terminations | truncations)
    envs.close()
    acting.train()
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
    obs_dim, n_actions = data["observations"].shape[1], int(action_space.n)

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

    network = BCQNetwork(obs_dim, n_actions, args.hidden_dim).to(device)
    target_network = BCQNetwork(obs_dim, n_actions, args.hidden_dim).to(device)
    target_network.load_state_dict(network.state_dict())
    optimizer = torch.optim.Adam(network.parameters(), lr=args.learning_rate, fused=True)
    acting = ActingPolicy(network, args.threshold)
    num_transitions = len(data["rewards"])
    # All that a checkpoint holds, besides the RNGs: the averaged target network too.
    state = {"network": network, "target_network": target_network, "optimizer": optimizer}
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
    signal.signal(signal.SIGINT, stop_after_this_step)
    for global_step in range(first_step, args.total_steps + 1):
        # ALGO LOGIC: training
        indices = torch.randint(num_transitions, (args.batch_size,), device=device)
        observations, actions = data["observations"][indices], data["actions"][indices]
        rewards, next_observations = data["rewards"][indices], data["next_observations"][indices]
        with torch.no_grad():
            next_q_online, next_imitation_logits = network(next_observations)
            next_q_target = target_network.q_values(next_observations)
            targets = bcq_target(rewards, data["terminations"][indices], next_q_online, next_q_target,
                                 next_imitation_logits, args.gamma, args.threshold)
        q_values, imitation_logits = network(observations)
        q_data = q_values.gather(1, actions.unsqueeze(1)).squeeze(1)
        td_loss = F.smooth_l1_loss(q_data, targets)
        imitation_loss = F.cross_entropy(imitation_logits, actions)
        logit_loss = imitation_logits.pow(2).mean()
        loss = td_loss + imitation_loss + args.logit_penalty * logit_loss

        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if global_step % args.target_network_frequency == 0:
            with torch.no_grad():  # one fused lerp over all parameters; with tau 1.0 it is an exact copy
                torch._foreach_lerp_(list(target_network.parameters()), list(network.parameters()), args.tau)
        # ALGO LOGIC END

        evaluate_now = global_step % args.eval_freq == 0 or global_step == args.total_steps
        if global_step % args.log_freq == 0 or evaluate_now:
            # Checked here, not every step: reading a loss waits for it, and that costs updates per second.
            losses = {"td_loss": td_loss.item(), "imitation_loss": imitation_loss.item(),
                      "logit_loss": logit_loss.item(), "loss": loss.item()}
            if not np.isfinite(losses["loss"]):
                rounded = {name: round(value, 6) for name, value in last_losses.items()}
                fail(f"the loss became {losses['loss']} at gradient step {global_step} (checked every --log-freq "
                     f"steps); last finite losses: {rounded}. Try a lower --learning-rate.")
            last_losses = losses
            for name, value in losses.items():
                writer.add_scalar(f"losses/{name}", value, global_step)
            writer.add_scalar("diagnostics/q_data", q_data.mean().item(), global_step)
            allowed_count = allowed_actions(imitation_logits, args.threshold).float().sum(dim=1).mean()
            writer.add_scalar("diagnostics/allowed_actions", allowed_count.item(), global_step)
            sps = global_step / (time.time() - start_time - eval_time)
            writer.add_scalar("charts/SPS", sps, global_step)

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
            writer.add_scalar("diagnostics/q_initial", evaluation["q_initial"], global_step)
            writer.add_scalar("diagnostics/discounted_return_initial", evaluation["discounted_return_initial"],
                              global_step)
            print(f"step {global_step}/{args.total_steps}  return {evaluation['mean_return']:.1f} ± "
                  f"{evaluation['std_return']:.1f}  Q(s0) {evaluation['q_initial']:.1f} vs discounted return "
                  f"{evaluation['discounted_return_initial']:.1f}  "
                  f"td_loss {td_loss.item():.3f}  SPS {sps:.0f}", flush=True)
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
        write_atomically(model_path, lambda path: torch.save(network.state_dict(), path))
        export_policy(acting, obs_dim, run_dir / "policy.pt2", {
            "env_id": env_id, "algorithm": args.exp_name, "dataset": args.dataset, "step": global_step,
            "observation_shape": [obs_dim], "action_space": {"n": n_actions},
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
