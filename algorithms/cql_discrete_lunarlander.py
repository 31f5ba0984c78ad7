"""Offline CQL(H) on a DQN for discrete actions (Kumar et al., 2020, "Conservative Q-Learning for Offline RL").

The Q-network never acts during training: it learns from a fixed dataset of transitions. Plain DQN then
over-estimates the actions the dataset never took (nothing ever corrects them), and its greedy policy picks
exactly those. CQL(H) adds to the TD loss the regulariser of the paper's eq. 4,

    cql_alpha * E_{s ~ D} [ log sum_a exp Q(s, a)  -  E_{a ~ D(.|s)} Q(s, a) ],

which pushes down a soft maximum of Q over all actions and pushes up Q of the dataset's actions: values of
unseen actions are kept below those of seen ones, and the learned Q is a lower bound of the true value.
`--cql-alpha 0` is plain offline DQN, the baseline that shows why the term exists.

    python algorithms/cql_discrete_lunarlander.py --dataset datasets/LunarLander-v3/expert.npz
    python algorithms/cql_discrete_lunarlander.py --cql-alpha 0      # offline DQN, for comparison

At each evaluation `diagnostics/q_initial` (the mean of max_a Q(s0, a) over the evaluation episodes' first
states) is logged next to `diagnostics/discounted_return_initial` (what those episodes really got): offline
DQN over-estimates, CQL stays at or below the truth. Datasets come from data_collection/collect_dataset.py.

Defaults: Adam 1e-3, batch 64, gamma 0.99, cql_alpha 1, Huber TD loss, a hard target copy every 1000 steps,
50k gradient steps. On the 200k-transition LunarLander-v3 expert dataset they reach 235-246 (3 seeds) in
about 2 minutes on one CPU core, where offline DQN (`--cql-alpha 0`) falls to -190 to -232 while predicting
Q(s0) of about 50 for episodes whose real discounted return is negative. With the hard target copy Q-values
rise towards their fixed point slowly (50 copies in 50k steps), so CQL's q_initial stays well below the truth.
"""

import json
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, Optional

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
    """save the Q-network's state_dict to <run folder>/<exp_name>.pt"""
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

    # CQL-DQN
    learning_rate: float = 1e-3
    """Adam learning rate"""
    batch_size: int = 64
    """transitions per gradient step"""
    gamma: float = 0.99
    """discount factor"""
    cql_alpha: float = 1.0
    """weight of the CQL(H) regulariser; 0 gives plain offline DQN"""
    hidden_dim: int = 256
    """width of the Q-network's two hidden layers"""
    td_loss: Literal["huber", "mse"] = "huber"
    """TD loss: Huber (smooth L1, as in DQN) or mean squared error"""
    double_dqn: bool = False
    """Double DQN target: the online network picks the next action, the target network values it"""
    target_update: Literal["hard", "polyak"] = "hard"
    """target network: hard copy every --target-network-frequency steps, or Polyak averaging with --tau each step"""
    target_network_frequency: int = 1000
    """gradient steps between hard target copies"""
    tau: float = 0.005
    """Polyak averaging rate of the target network"""
    log_freq: int = 100
    """gradient steps between loss logs"""


def fail(message: str) -> None:
    """Stop with a message and exit status 1, without a traceback."""
    raise SystemExit(f"error: {message}")


# ------------------------------------------------------------------------------------------------- dataset
def load_dataset(path: str, device: torch.device) -> tuple[dict[str, torch.Tensor], dict]:
    """The whole dataset as tensors on the device, so that a batch is one torch.randint and an index."""
    if not Path(path).is_file():
        env_id, policy = Path(path).parent.name or "LunarLander-v3", Path(path).stem
        fail(f"dataset {path} does not exist. Build it with:\n  python data_collection/collect_dataset.py "
             f"--env-id {env_id} --policy {policy if policy in ('expert', 'noisy', 'random') else 'expert'} --output {path}")
    with np.load(path, allow_pickle=False) as file:
        arrays = {key: file[key] for key in file.files}
    missing = {"observations", "actions", "rewards", "next_observations", "terminations", "metadata"} - set(arrays)
    if missing:
        fail(f"{path} is not a dataset of data_collection/collect_dataset.py: it lacks {', '.join(sorted(missing))}")
    if arrays["actions"].ndim != 1 or not np.issubdtype(arrays["actions"].dtype, np.integer):
        fail(f"{path} has continuous (Box) actions of shape {arrays['actions'].shape[1:]}; this script needs "
             f"discrete actions: use algorithms/cql_sac_continuous.py or algorithms/bcq_continuous.py")
    data = {
        "observations": torch.tensor(arrays["observations"], dtype=torch.float32, device=device),
        "actions": torch.tensor(arrays["actions"], dtype=torch.long, device=device),
        "rewards": torch.tensor(arrays["rewards"], dtype=torch.float32, device=device),
        "next_observations": torch.tensor(arrays["next_observations"], dtype=torch.float32, device=device),
        # Only true terminations stop bootstrapping; a time-limit truncation still bootstraps.
        "terminations": torch.tensor(arrays["terminations"], dtype=torch.float32, device=device),
    }
    return data, json.loads(str(arrays["metadata"]))


# ------------------------------------------------------------------------------------------------- networks
class QNetwork(nn.Module):
    def __init__(self, obs_dim: int, n_actions: int, hidden_dim: int):
        super().__init__()
        self.network = nn.Sequential(
            nn.Linear(obs_dim, hidden_dim), nn.ReLU(),
            nn.Linear(hidden_dim, hidden_dim), nn.ReLU(),
            nn.Linear(hidden_dim, n_actions),
        )

    def forward(self, observations: torch.Tensor) -> torch.Tensor:
        return self.network(observations)


def cql_penalty(q_values: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """CQL(H) regulariser, eq. 4 of Kumar et al. (2020): mean over s of logsumexp_a Q(s, a) - Q(s, a_data)."""
    logsumexp_q = torch.logsumexp(q_values, dim=1)
    q_data = q_values.gather(1, actions.unsqueeze(1)).squeeze(1)
    return (logsumexp_q - q_data).mean()


def td_target(
    rewards: torch.Tensor, terminations: torch.Tensor, next_q_target: torch.Tensor, gamma: float,
    next_q_online: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """r + gamma * (1 - terminal) * Q_target(s', a'), with a' = argmax Q_target(s', .) (DQN) or argmax of the
    online network's Q(s', .) when it is given (Double DQN, van Hasselt et al., 2016)."""
    chooser = next_q_target if next_q_online is None else next_q_online
    next_actions = chooser.argmax(dim=1, keepdim=True)
    next_value = next_q_target.gather(1, next_actions).squeeze(1)
    return rewards + gamma * (1.0 - terminations) * next_value


# ------------------------------------------------------------------------------------------------- evaluation
def evaluate(q_network: QNetwork, env_id: str, episodes: int, seed: int, gamma: float, device: torch.device,
             video_folder: Optional[Path] = None, video_prefix: str = "eval") -> dict[str, np.ndarray]:
    """Greedy episodes batched in a vector env; returns their returns, discounted returns and first-state values."""

    def make_env(index: int):
        def thunk():
            if video_folder is not None and index == 0:
                env = gym.make(env_id, render_mode="rgb_array")
                return gym.wrappers.RecordVideo(env, str(video_folder), episode_trigger=lambda episode: episode == 0,
                                                name_prefix=video_prefix, disable_logger=True)
            return gym.make(env_id)
        return thunk

    envs = gym.vector.SyncVectorEnv([make_env(i) for i in range(episodes)], autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
    observations, _ = envs.reset(seed=[seed * 1000 + i for i in range(episodes)])
    returns, discounted_returns = np.zeros(episodes), np.zeros(episodes)
    running, discount, q_initial = np.ones(episodes, dtype=bool), 1.0, None
    q_network.eval()
    while running.any():
        with torch.no_grad():
            q_values = q_network(torch.tensor(observations, dtype=torch.float32, device=device))
        if q_initial is None:
            q_initial = q_values.max(dim=1).values.cpu().numpy()
        observations, rewards, terminations, truncations, _ = envs.step(q_values.argmax(dim=1).cpu().numpy())
        returns += np.where(running, rewards, 0.0)
        discounted_returns += np.where(running, discount * rewards, 0.0)
        discount *= gamma
        running &= ~(terminations | truncations)
    envs.close()
    q_network.train()
    return {"returns": returns, "discounted_returns": discounted_returns, "q_initial": q_initial}


def normalized_score(mean_return: float, reference_returns: dict) -> Optional[float]:
    """D4RL's normalised score: 0 is a uniform random policy, 100 the expert that made the dataset's references."""
    if not reference_returns or reference_returns.get("expert") is None:
        return None
    return 100.0 * (mean_return - reference_returns["random"]) / (reference_returns["expert"] - reference_returns["random"])


# ------------------------------------------------------------------------------------------------- main
if __name__ == "__main__":
    args = tyro.cli(Args, description=__doc__)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")

    if args.total_steps < 1 or args.eval_freq < 1 or args.eval_episodes < 1:
        fail("--total-steps, --eval-freq and --eval-episodes must be at least 1")
    data, metadata = load_dataset(args.dataset, device)
    env_id = args.env_id or metadata.get("env_id")
    if env_id is None:
        fail(f"{args.dataset} does not name its env; give --env-id")
    try:
        probe_env = gym.make(env_id)
    except gym.error.Error as error:
        fail(f"cannot make env {env_id!r}: {error}")
    if not isinstance(probe_env.action_space, gym.spaces.Discrete):
        fail(f"{env_id} has actions {probe_env.action_space}; this script needs a Discrete action space")
    obs_dim, n_actions = data["observations"].shape[1], int(probe_env.action_space.n)
    dataset_actions = metadata.get("action_space", {}).get("n", int(data["actions"].max()) + 1)
    if probe_env.observation_space.shape != (obs_dim,) or dataset_actions != n_actions:
        fail(f"dataset and env do not match: dataset {args.dataset} has obs_dim {obs_dim} and {dataset_actions} actions, "
             f"env {env_id} has observation shape {probe_env.observation_space.shape} and {n_actions} actions")
    probe_env.close()

    run_name = f"{env_id}__{args.exp_name}__{Path(args.dataset).stem}__{args.seed}__{int(time.time())}"
    run_dir = Path("runs") / run_name
    if args.track:
        try:
            import wandb
        except ImportError:
            fail("--track needs wandb: pip install wandb")
        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, sync_tensorboard=True,
                   config=vars(args), name=run_name, save_code=True)
    writer = SummaryWriter(str(run_dir))
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in vars(args).items()))

    q_network = QNetwork(obs_dim, n_actions, args.hidden_dim).to(device)
    target_network = QNetwork(obs_dim, n_actions, args.hidden_dim).to(device)
    target_network.load_state_dict(q_network.state_dict())
    optimizer = torch.optim.Adam(q_network.parameters(), lr=args.learning_rate, fused=True)
    num_transitions = len(data["rewards"])
    print(f"{args.exp_name}: {num_transitions} transitions from {args.dataset}, evaluating on {env_id}, run folder {run_dir}")

    start_time, eval_time, evaluations, last_losses = time.time(), 0.0, [], {}
    for global_step in range(1, args.total_steps + 1):
        indices = torch.randint(num_transitions, (args.batch_size,), device=device)
        observations, actions = data["observations"][indices], data["actions"][indices]
        rewards, next_observations = data["rewards"][indices], data["next_observations"][indices]
        with torch.no_grad():
            next_q_online = q_network(next_observations) if args.double_dqn else None
            targets = td_target(rewards, data["terminations"][indices], target_network(next_observations), args.gamma, next_q_online)
        q_values = q_network(observations)
        q_data = q_values.gather(1, actions.unsqueeze(1)).squeeze(1)
        td_loss = F.smooth_l1_loss(q_data, targets) if args.td_loss == "huber" else F.mse_loss(q_data, targets)
        cql_loss = cql_penalty(q_values, actions)
        loss = td_loss + args.cql_alpha * cql_loss

        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if args.target_update == "polyak":
            with torch.no_grad():
                # One fused lerp over all parameters: target <- target + tau * (online - target).
                torch._foreach_lerp_(list(target_network.parameters()), list(q_network.parameters()), args.tau)
        elif global_step % args.target_network_frequency == 0:
            target_network.load_state_dict(q_network.state_dict())

        if global_step % args.log_freq == 0:
            # Checked here, not every step: reading a loss waits for it, and that costs updates per second.
            losses = {"td_loss": td_loss.item(), "cql_loss": cql_loss.item(), "loss": loss.item()}
            if not np.isfinite(losses["loss"]):
                fail(f"the loss became {losses['loss']} at gradient step {global_step} (checked every --log-freq steps); "
                     f"last finite losses: { {name: round(value, 6) for name, value in last_losses.items()} }. "
                     f"Try a lower --learning-rate.")
            last_losses = losses
            for name, value in losses.items():
                writer.add_scalar(f"losses/{name}", value, global_step)
            writer.add_scalar("diagnostics/q_data", q_data.mean().item(), global_step)
            writer.add_scalar("diagnostics/logsumexp_q", torch.logsumexp(q_values, dim=1).mean().item(), global_step)
            writer.add_scalar("charts/SPS", global_step / (time.time() - start_time - eval_time), global_step)

        if global_step % args.eval_freq == 0 or global_step == args.total_steps:
            eval_start = time.time()
            video_folder = run_dir / "videos" if args.capture_video else None
            result = evaluate(q_network, env_id, args.eval_episodes, args.seed, args.gamma, device, video_folder, f"step{global_step}")
            eval_time += time.time() - eval_start
            mean_return = float(result["returns"].mean())
            score = normalized_score(mean_return, metadata.get("reference_returns"))
            evaluations.append({
                "step": global_step, "mean_return": mean_return, "std_return": float(result["returns"].std()),
                "normalized_score": score, "q_initial": float(result["q_initial"].mean()),
                "discounted_return_initial": float(result["discounted_returns"].mean()),
            })
            writer.add_scalar("eval/episodic_return", mean_return, global_step)
            if score is not None:
                writer.add_scalar("eval/normalized_score", score, global_step)
            writer.add_scalar("diagnostics/q_initial", evaluations[-1]["q_initial"], global_step)
            writer.add_scalar("diagnostics/discounted_return_initial", evaluations[-1]["discounted_return_initial"], global_step)
            sps = global_step / (time.time() - start_time - eval_time)
            print(f"step {global_step}/{args.total_steps}  return {mean_return:.1f} ± {result['returns'].std():.1f}  "
                  f"Q(s0) {evaluations[-1]['q_initial']:.1f} vs discounted return {evaluations[-1]['discounted_return_initial']:.1f}  "
                  f"td_loss {td_loss.item():.3f}  SPS {sps:.0f}", flush=True)

    wall_time = time.time() - start_time
    model_path = run_dir / f"{args.exp_name}.pt"
    if args.save_model:
        temporary = model_path.with_suffix(".pt.tmp")
        torch.save(q_network.state_dict(), temporary)
        os.replace(temporary, model_path)
        print(f"model saved to {model_path}")
    summary = {
        "args": asdict(args), "env_id": env_id, "dataset": args.dataset, "run_dir": str(run_dir),
        "model_path": str(model_path) if args.save_model else None,
        "final_returns": result["returns"].tolist(), "final_mean_return": mean_return,
        "final_std_return": float(result["returns"].std()), "final_normalized_score": score,
        "total_steps": args.total_steps, "wall_time_s": wall_time, "eval_time_s": eval_time,
        "updates_per_second": args.total_steps / (wall_time - eval_time), "evaluations": evaluations,
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    writer.close()
    print(f"final return {mean_return:.1f} ± {result['returns'].std():.1f} over {args.eval_episodes} episodes; "
          f"{summary['updates_per_second']:.0f} updates/s, {wall_time:.0f} s.\nRun folder {run_dir} "
          f"(summary.json, TensorBoard events: tensorboard --logdir runs)")
