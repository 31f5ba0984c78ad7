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
when acting), or Discrete ones (the Actor and TwinCritic say how). Defaults are the paper's for locomotion
(ikostrikov/implicit_q_learning), except where a field says otherwise.
"""

import copy
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

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
    """save nn.ModuleDict(actor=..., critic=..., value=...)'s state_dict to <run folder>/<exp_name>.pt"""
    dataset: str = "datasets/Hopper-v5/medium-expert.npz"
    """dataset file (.npz) made by data_collection/collect_dataset.py"""
    env_id: Optional[str] = None
    """env to evaluate on; None: the dataset's env_id"""
    total_steps: int = 100_000
    """number of gradient steps (the paper: 1M, 3.2 hours on one CPU core; 100k, about 19 minutes)"""
    eval_freq: int = 10_000
    """evaluate every this many gradient steps (and after the last one)"""
    eval_episodes: int = 10
    """episodes per evaluation, run together in a vector env"""
    threads: int = 1
    """torch CPU threads: 1 is fastest for these small networks and lets parallel runs share the cores"""

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
    """standardise observations with the dataset's mean and std, kept in the saved model (not in the paper)"""
    log_freq: int = 100
    """gradient steps between loss logs"""


def fail(message: str) -> None:
    """Stop with a message and exit status 1, without a traceback."""
    raise SystemExit(f"error: {message}")


# ------------------------------------------------------------------------------------------------- dataset
def load_dataset(path: str, device: torch.device) -> tuple[dict[str, torch.Tensor], dict, np.ndarray]:
    """The dataset as tensors on the device (a batch is one torch.randint and an index), metadata, episode returns."""
    if not Path(path).is_file():
        env_id, policy = Path(path).parent.name or "Hopper-v5", Path(path).stem
        policy = policy if policy in ("expert", "noisy", "random") else "expert"
        fail(f"dataset {path} does not exist. Build it with:\n  python data_collection/collect_dataset.py "
             f"--env-id {env_id} --policy {policy} --output {path}")
    with np.load(path, allow_pickle=False) as file:
        arrays = {key: file[key] for key in file.files}
    missing = {"observations", "actions", "rewards", "next_observations", "terminations", "metadata"} - set(arrays)
    if missing:
        fail(f"{path} is not a dataset of data_collection/collect_dataset.py: it lacks {', '.join(sorted(missing))}")
    discrete = arrays["actions"].ndim == 1 and np.issubdtype(arrays["actions"].dtype, np.integer)
    if not discrete and arrays["actions"].ndim != 2:
        fail(f"{path} has actions of shape {arrays['actions'].shape}: expected [transitions] or [transitions, act_dim]")
    # Only true terminations stop bootstrapping; a time-limit truncation still bootstraps.
    data = {key: torch.tensor(arrays[key], dtype=torch.float32, device=device)
            for key in ("observations", "rewards", "next_observations", "terminations")}
    data["actions"] = torch.tensor(arrays["actions"], dtype=torch.long if discrete else torch.float32, device=device)
    return data, json.loads(str(arrays["metadata"])), arrays.get("episode_returns", np.zeros(0))


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
def evaluate(actor: Actor, critic: TwinCritic, low: Optional[torch.Tensor], high: Optional[torch.Tensor], env_id: str,
             episodes: int, seed: int, gamma: float, reward_scale: float, device: torch.device,
             video_folder: Optional[Path] = None, video_prefix: str = "eval") -> dict[str, np.ndarray]:
    """Deterministic episodes in a vector env (Box actions mapped to [low, high]): returns, discounted returns, and
    min(Q1, Q2) of the first states and actions, in the env's reward units."""

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
    running, discount, q_initial = np.ones(episodes, dtype=bool), 1.0, None
    while running.any():
        with torch.no_grad():
            normalized = actor.normalize(torch.tensor(observations, dtype=torch.float32, device=device))
            actions = actor.deterministic(normalized)
            if q_initial is None:
                q_initial = (torch.minimum(*critic(normalized, actions)) / reward_scale).cpu().numpy()
            if not actor.discrete:
                actions = low + 0.5 * (actions + 1.0) * (high - low)
        observations, rewards, terminations, truncations, _ = envs.step(actions.cpu().numpy())
        returns += np.where(running, rewards, 0.0)
        discounted_returns += np.where(running, discount * rewards, 0.0)
        discount *= gamma
        running &= ~(terminations | truncations)
    envs.close()
    return {"returns": returns, "discounted_returns": discounted_returns, "q_initial": q_initial}


def normalized_score(mean_return: float, reference_returns: dict) -> Optional[float]:
    """D4RL's normalised score: 0 is a uniform random policy, 100 the expert that made the dataset's references."""
    if not reference_returns or reference_returns.get("expert") is None:
        return None
    low, high = reference_returns["random"], reference_returns["expert"]
    return 100.0 * (mean_return - low) / (high - low)


# ------------------------------------------------------------------------------------------------- main
if __name__ == "__main__":
    args = tyro.cli(Args, description=__doc__)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    if min(args.total_steps, args.eval_freq, args.eval_episodes, args.batch_size, args.log_freq) < 1:
        fail("--total-steps, --eval-freq, --eval-episodes, --batch-size and --log-freq must be at least 1")
    if not 0.0 < args.expectile < 1.0:
        fail(f"--expectile {args.expectile} must lie strictly between 0 and 1")

    data, metadata, episode_returns = load_dataset(args.dataset, device)
    env_id = args.env_id or metadata.get("env_id")
    if env_id is None:
        fail(f"{args.dataset} does not name its env; give --env-id")
    try:
        probe_env = gym.make(env_id)
    except gym.error.Error as error:
        fail(f"cannot make env {env_id!r}: {error}")
    space, obs_dim = probe_env.action_space, data["observations"].shape[1]
    discrete, described = data["actions"].dtype == torch.long, metadata.get("action_space", {})
    if discrete:
        n_actions, action_dim, low, high = described.get("n", int(data["actions"].max()) + 1), 0, None, None
        data_space = gym.spaces.Discrete(n_actions)
    else:
        n_actions, action_dim = 0, data["actions"].shape[1]
        low, high = (np.array(described.get(key, getattr(space, key, np.zeros(action_dim))), dtype=np.float32)
                     for key in ("low", "high"))
        data_space = gym.spaces.Box(low, high, dtype=np.float32)
    if probe_env.observation_space.shape != (obs_dim,) or space != data_space:
        fail(f"dataset and env do not match: dataset {args.dataset} has obs_dim {obs_dim} and actions {data_space}, "
             f"env {env_id} has observation shape {probe_env.observation_space.shape} and actions {space}")
    if not discrete and not (np.isfinite(space.low).all() and np.isfinite(space.high).all()):
        fail(f"{env_id} has unbounded actions {space}; the actor's tanh needs finite bounds")
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
    table = "\n".join(f"|{key}|{value}|" for key, value in vars(args).items())
    writer.add_text("hyperparameters", f"|param|value|\n|-|-|\n{table}")

    actor = Actor(obs_dim, action_dim, n_actions, args.hidden_dim).to(device)
    critic = TwinCritic(obs_dim, action_dim, n_actions, args.hidden_dim).to(device)
    value = mlp(obs_dim, 1, args.hidden_dim).to(device)
    if args.normalize_observations:
        actor.obs_mean.copy_(data["observations"].mean(dim=0))
        actor.obs_std.copy_(data["observations"].std(dim=0) + 1e-3)
    # Standardised once here, so an update spends nothing on it; the clamp covers actions a hair outside the bounds.
    data["observations"] = actor.normalize(data["observations"])
    data["next_observations"] = actor.normalize(data["next_observations"])
    if not discrete:
        low, high = (torch.tensor(bound, dtype=torch.float32, device=device) for bound in (space.low, space.high))
        data["actions"] = (2.0 * (data["actions"] - low) / (high - low) - 1.0).clamp(-1.0, 1.0)
    return_range = float(np.ptp(episode_returns)) if args.normalize_rewards and len(episode_returns) > 1 else 0.0
    reward_scale = 1000.0 / return_range if return_range > 0 else 1.0
    data["rewards"] = data["rewards"] * reward_scale
    target_critic = copy.deepcopy(critic)
    # The three losses touch disjoint parameters (targets and advantages are detached), so one backward pass and one
    # Adam step over their sum is the same update as three, at less cost. Only the actor's group decays (cosine).
    groups = [{"params": module.parameters()} for module in (actor, critic, value)]
    optimizer = torch.optim.Adam(groups, lr=args.learning_rate, fused=True)
    decay = [lambda step: 0.5 * (1.0 + math.cos(math.pi * step / args.total_steps)), lambda _: 1.0, lambda _: 1.0]
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, decay)
    num_transitions = len(data["rewards"])
    print(f"{args.exp_name}: {num_transitions} transitions from {args.dataset} (rewards x {reward_scale:.4g}), "
          f"evaluating on {env_id}, run folder {run_dir}")

    start_time, eval_time, evaluations, last_losses = time.time(), 0.0, [], {}
    for global_step in range(1, args.total_steps + 1):
        indices = torch.randint(num_transitions, (args.batch_size,), device=device)
        observations, actions, rewards = (data[key][indices] for key in ("observations", "actions", "rewards"))
        next_observations, terminations = data["next_observations"][indices], data["terminations"][indices]

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

        if global_step % args.log_freq == 0:
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
            writer.add_scalar("charts/SPS", global_step / (time.time() - start_time - eval_time), global_step)

        if global_step % args.eval_freq == 0 or global_step == args.total_steps:
            eval_start = time.time()
            result = evaluate(actor, critic, low, high, env_id, args.eval_episodes, args.seed, args.gamma, reward_scale,
                              device, run_dir / "videos" if args.capture_video else None, f"step{global_step}")
            eval_time += time.time() - eval_start
            mean_return = float(result["returns"].mean())
            score = normalized_score(mean_return, metadata.get("reference_returns"))
            evaluation = {
                "step": global_step, "mean_return": mean_return, "std_return": float(result["returns"].std()),
                "normalized_score": score, "q_initial": float(result["q_initial"].mean()),
                "discounted_return_initial": float(result["discounted_returns"].mean()),
            }
            evaluations.append(evaluation)
            writer.add_scalar("eval/episodic_return", mean_return, global_step)
            if score is not None:
                writer.add_scalar("eval/normalized_score", score, global_step)
            for tag in ("q_initial", "discounted_return_initial"):
                writer.add_scalar(f"diagnostics/{tag}", evaluation[tag], global_step)
            sps = global_step / (time.time() - start_time - eval_time)
            print(f"step {global_step}/{args.total_steps}  return {mean_return:.1f} ± {evaluation['std_return']:.1f}  "
                  f"Q(s0) {evaluation['q_initial']:.1f} vs discounted return "
                  f"{evaluation['discounted_return_initial']:.1f}  SPS {sps:.0f}", flush=True)

    wall_time = time.time() - start_time
    model_path = run_dir / f"{args.exp_name}.pt"
    if args.save_model:
        temporary = model_path.with_suffix(".pt.tmp")
        torch.save(nn.ModuleDict({"actor": actor, "critic": critic, "value": value}).state_dict(), temporary)
        os.replace(temporary, model_path)
        print(f"model saved to {model_path}")
    summary = {
        "args": asdict(args), "env_id": env_id, "dataset": args.dataset, "run_dir": str(run_dir),
        "model_path": str(model_path) if args.save_model else None, "reward_scale": reward_scale,
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
