"""Build an offline RL dataset from a pretrained Stable-Baselines3 agent on the Hugging Face Hub.

    python data_collection/collect_dataset.py --env-id LunarLander-v3 --policy expert
    python data_collection/collect_dataset.py --env-id Hopper-v5 --policy noisy
    python data_collection/collect_dataset.py --env-id LunarLander-v3 --policy expert --algo dqn \
        --output datasets/LunarLander-v3/medium.npz

Policies:
  expert  the agent's deterministic action.
  noisy   the expert, but at each step with probability --random-action-prob a uniform random action, and
          for Box actions Gaussian noise (--noise-std times half the action range) on the other steps: the
          "imperfect demonstrations" of BCQ (Fujimoto et al., 2019, section 6).
  sampled the agent's own stochastic policy: an action drawn from its distribution at every step (a Gaussian,
          squashed for SAC and TQC and clipped for PPO and A2C, or a categorical for discrete actions), as D4RL
          recorded its MuJoCo datasets. The data then holds several actions near each visited state, where expert
          holds one. Agents trained with gSDE get a fresh exploration matrix every step. Only agents with a
          stochastic policy (a2c, ppo, trpo, sac, tqc, crossq) can sample; DQN's epsilon-greedy is --policy noisy.
  random  uniform random actions.

The agent comes from `sb3/<algo>-<EnvId>` on the Hub (downloaded with huggingface_hub.hf_hub_download, so
HF_HUB_OFFLINE=1 and HF_HUB_CACHE=<folder> make it read a local cache) or from a local zip (--agent-path; a
vec_normalize.pkl and config.yml next to the zip are used too). The sb3 zoo trained on env ids that today's
gymnasium no longer has: LunarLander-v2 agents run on LunarLander-v3, MuJoCo -v3 agents on -v5.

Observations are stored raw; an agent trained under VecNormalize gets its normalised view only as its input.
The file also holds reference returns (a uniform random policy and the env's deterministic expert, each over
--reference-episodes seeded episodes) for D4RL's normalised score: 100 * (R - R_random) / (R_expert - R_random).
"""

from __future__ import annotations

import difflib
import importlib.metadata
import json
import pickle
import shlex
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Optional

import gymnasium as gym
import numpy as np
import yaml
from dataset_io import (
    DatasetError,
    check_range,
    default_dataset_path,
    describe_space,
    exit_on_dataset_error,
    parse_flags,
    prepare_output,
    quiet_mujoco_deprecations,
    save_dataset,
)
from tqdm import tqdm

# The expert of each default experiment (the table of default agents in README.md's "Building datasets"); it also
# gives the env's "expert" reference return.
DEFAULT_EXPERT_REPOS = {
    "LunarLander-v3": "sb3/ppo-LunarLander-v2",
    "BipedalWalker-v3": "sb3/a2c-BipedalWalker-v3",
    "Hopper-v5": "sb3/tqc-Hopper-v3",
}
MUJOCO_ENVS = (
    "Ant",
    "HalfCheetah",
    "Hopper",
    "Humanoid",
    "HumanoidStandup",
    "InvertedDoublePendulum",
    "InvertedPendulum",
    "Pusher",
    "Reacher",
    "Swimmer",
    "Walker2d",
)
# Algorithms whose policy is a distribution to sample from; the others (dqn, qrdqn, td3, ddpg, ars) act greedily.
STOCHASTIC_ALGOS = ("a2c", "ppo", "trpo", "sac", "tqc", "crossq")
REFERENCE_SEED = 1_000_000  # reference episodes use seeds REFERENCE_SEED + i, apart from any collection seed


@dataclass
class Args:
    env_id: str = "LunarLander-v3"
    """gymnasium env id to collect on (today's id, e.g. LunarLander-v3, BipedalWalker-v3, Hopper-v5)"""
    policy: Literal["expert", "noisy", "sampled", "random"] = "expert"
    """expert: the agent's deterministic action; noisy: the expert with random actions and noise; sampled: drawn from
    the agent's stochastic policy (D4RL's way); random: uniform"""
    repo_id: Optional[str] = None
    """Hub repo of the agent, e.g. sb3/ppo-LunarLander-v2; None: the env's expert, or sb3/<algo>-<EnvId> with --algo"""
    algo: Optional[str] = None
    """SB3 algorithm of the agent (ppo, a2c, dqn, sac, td3, tqc, ...): picks the rl-zoo repo sb3/<algo>-<EnvId>"""
    agent_path: Optional[Path] = None
    """local SB3 zip to use instead of the Hub (a vec_normalize.pkl and config.yml beside it are used too)"""
    num_transitions: int = 200_000
    """number of transitions in the dataset"""
    output: Optional[Path] = None
    """where to write the dataset; None: datasets/<env_id>/<policy>.npz"""
    seed: int = 0
    """seed of the envs (env i gets seed + i) and of the random actions, noise and sampled actions"""
    num_envs: int = 8
    """envs stepped together in a vector env, with one batched agent prediction per step"""
    overwrite: bool = False
    """replace the output file if it exists"""
    random_action_prob: float = 0.3
    """noisy policy: probability of a uniform random action at each step"""
    noise_std: float = 0.3
    """noisy policy, Box actions: std of the Gaussian noise, as a fraction of half the action range"""
    reference_episodes: int = 20
    """episodes used to measure each reference return (random policy, deterministic expert)"""
    reference_repo_id: Optional[str] = None
    """Hub repo of the agent whose return is the expert reference; None: the env's expert, else the collecting agent"""
    reference_agent_path: Optional[Path] = None
    """local SB3 zip that defines the expert reference return, instead of --reference-repo-id"""


# ---------------------------------------------------------------------------------------------- env ids
def hub_env_id(env_id: str) -> str:
    """The env id the sb3 zoo trained its agents on, for today's id (LunarLander-v3 -> LunarLander-v2)."""
    name, _, version = env_id.rpartition("-v")
    if name in ("LunarLander", "LunarLanderContinuous") and version == "3":
        return f"{name}-v2"
    if name in MUJOCO_ENVS and version == "5":
        return f"{name}-v3"
    return env_id


def current_env_id(agent_env_id: str) -> str:
    """Today's env id for the id an agent was trained on (LunarLander-v2 -> -v3, MuJoCo -v2/-v3/-v4 -> -v5)."""
    name, _, version = agent_env_id.rpartition("-v")
    if name in ("LunarLander", "LunarLanderContinuous") and version == "2":
        return f"{name}-v3"
    if name in MUJOCO_ENVS and version in ("2", "3", "4"):
        return f"{name}-v5"
    return agent_env_id


def make_env_checked(env_id: str) -> gym.Env:
    """gym.make with a clear message for an unknown or deprecated id or a missing dependency; MuJoCo's warnings
    about gymnasium's own models are silenced before the first env is made."""
    try:
        quiet_mujoco_deprecations(env_id)
        return gym.make(env_id)
    except (gym.error.DependencyNotInstalled, ImportError) as error:  # MuJoCo -v2/-v3 and mujoco: ImportErrors
        today = current_env_id(env_id)
        hint = f" Today's id for it is {today}." if today != env_id else ""
        raise DatasetError(f"{env_id} needs a package that is not installed: {error}{hint}") from None
    except gym.error.Error as error:
        hint = ""
        if current_env_id(env_id) != env_id:
            hint = f" Today's id for it is {current_env_id(env_id)}."
        else:
            close = difflib.get_close_matches(env_id, list(gym.registry), n=3)
            if close:
                hint = f" Did you mean {', '.join(close)}?"
        raise DatasetError(f"unknown env id {env_id!r} ({error}).{hint}") from None


def make_vector_env(env_id: str, num_envs: int) -> gym.vector.SyncVectorEnv:
    # SAME_STEP autoreset: a finished env is reset within the step that ended it, and the step returns the
    # real final observation in infos["final_obs"] (the returned observation is already the reset one).
    return gym.vector.SyncVectorEnv(
        [lambda: gym.make(env_id) for _ in range(num_envs)], autoreset_mode=gym.vector.AutoresetMode.SAME_STEP
    )


# ---------------------------------------------------------------------------------------------- agents
def algorithm_classes() -> dict[str, type]:
    import sb3_contrib
    import stable_baselines3

    return {
        "a2c": stable_baselines3.A2C,
        "ppo": stable_baselines3.PPO,
        "dqn": stable_baselines3.DQN,
        "sac": stable_baselines3.SAC,
        "td3": stable_baselines3.TD3,
        "ddpg": stable_baselines3.DDPG,
        "tqc": sb3_contrib.TQC,
        "qrdqn": sb3_contrib.QRDQN,
        "trpo": sb3_contrib.TRPO,
        "ars": sb3_contrib.ARS,
        "crossq": sb3_contrib.CrossQ,
    }


@dataclass
class AgentSource:
    """Where an agent comes from: a Hub repo (`sb3/<algo>-<EnvId>`) or a local zip."""

    algo: str
    repo_id: Optional[str] = None
    path: Optional[Path] = None

    @property
    def name(self) -> str:
        return self.repo_id if self.repo_id is not None else str(self.path)

    @property
    def trained_on(self) -> Optional[str]:
        """The env id in the rl-zoo name `<algo>-<EnvId>`, if the name follows it."""
        stem = self.repo_id.split("/")[-1] if self.repo_id is not None else self.path.stem
        prefix = f"{self.algo}-"
        return stem[len(prefix) :] if stem.startswith(prefix) else None


def agent_source(
    env_id: str, repo_id: Optional[str], algo: Optional[str], path: Optional[Path]
) -> Optional[AgentSource]:
    """Resolve the flags to an agent; None when no agent is named and the env has no default expert."""
    if path is not None:
        algo = algo or path.stem.split("-")[0]
        return AgentSource(algo=algo.lower(), path=path)
    if repo_id is None and algo is not None:
        repo_id = f"sb3/{algo.lower()}-{hub_env_id(env_id)}"
    repo_id = repo_id or DEFAULT_EXPERT_REPOS.get(env_id)
    if repo_id is None:
        return None
    return AgentSource(algo=(algo or repo_id.split("/")[-1].split("-")[0]).lower(), repo_id=repo_id)


def download(repo_id: str, filename: str, required: bool = True) -> Optional[Path]:
    """hf_hub_download with a clear message for each way it fails; an optional file that is absent gives None."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return Path(hf_hub_download(repo_id=repo_id, filename=filename))
    except LocalEntryNotFoundError:
        # Offline (HF_HUB_OFFLINE=1 or no network) and not in the cache. For an optional file this is normal:
        # the caller checks config.yml to see whether the agent needs it.
        if not required:
            return None
        raise DatasetError(
            f"{filename} of {repo_id} is not in the local Hub cache and the Hub cannot be reached "
            f"(offline or HF_HUB_OFFLINE=1). On a machine with internet run "
            f"`hf download {repo_id} {filename}` (add --cache-dir <folder> and set HF_HUB_CACHE=<folder> here), "
            f"or pass --agent-path with a local zip."
        ) from None
    except RepositoryNotFoundError:
        raise DatasetError(
            f"Hub repo {repo_id} not found (or private). Check --repo-id or --algo; the sb3 agents are listed at "
            f"https://huggingface.co/sb3"
        ) from None
    except RevisionNotFoundError:
        raise DatasetError(f"Hub repo {repo_id} has no main revision") from None
    except EntryNotFoundError:
        if not required:
            return None
        raise DatasetError(f"Hub repo {repo_id} has no file {filename}; it is not an rl-zoo agent repo") from None
    except HfHubHTTPError as error:
        raise DatasetError(f"downloading {filename} of {repo_id} failed: {error}") from None


def read_zoo_config(path: Optional[Path]) -> dict[str, Any]:
    """rl-zoo's config.yml is a yaml-dumped OrderedDict; read it without yaml's unsafe loader."""
    if path is None:
        return {}

    class ZooConfigLoader(yaml.SafeLoader):
        pass

    ZooConfigLoader.add_constructor(
        "tag:yaml.org,2002:python/object/apply:collections.OrderedDict",
        lambda loader, node: dict(loader.construct_sequence(node, deep=True)[0]),
    )
    try:
        with open(path) as file:
            config = yaml.load(file, Loader=ZooConfigLoader)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        reason = " ".join(str(error).split())  # yaml's messages span several lines
        raise DatasetError(f"cannot read the agent's {path}: {reason}; download it again") from None
    return config if isinstance(config, dict) else {}


def needs_normalization(config: dict[str, Any]) -> bool:
    normalize = config.get("normalize", False)
    if isinstance(normalize, str):  # e.g. "{'norm_obs': True, 'norm_reward': False}" or "true"
        return normalize.lower() == "true" or "'norm_obs': True" in normalize
    return bool(normalize)


def space_from_zip(zip_path: Path, key: str) -> dict[str, Any]:
    """The agent's own space as saved in its zip (readable JSON fields, no unpickling of old gym classes)."""
    with zipfile.ZipFile(zip_path) as archive:
        saved = json.loads(archive.read("data"))[key]
    kind = saved.get(":type:", "")
    if "Discrete" in kind:
        return {"type": "Discrete", "n": int(saved["n"])}
    if "Box" in kind:
        shape = saved["shape"] if "shape" in saved else saved["_shape"]  # "_shape" since gymnasium 1.0
        description = {"type": "Box", "shape": list(json.loads(shape) if isinstance(shape, str) else shape)}
        if key == "action_space":
            for bound in ("low", "high"):
                description[bound] = [float(value) for value in saved[bound].strip("[]").split()]
        return description
    return {"type": kind}


def policy_module(zip_path: Path) -> Optional[str]:
    """The module of the agent's policy class, from the readable text beside its pickle (never unpickled: that
    could run code); None when the zip does not say."""
    try:
        with zipfile.ZipFile(zip_path) as archive:
            module = json.loads(archive.read("data"))["policy_class"]["__module__"]
    except (zipfile.BadZipFile, KeyError, TypeError, ValueError):
        return None
    return module if isinstance(module, str) else None


def check_agent_algo(zip_path: Path, source: AgentSource, classes: dict[str, type]) -> None:
    """Fail if the zip's policy class belongs to other algorithms than source.algo; say nothing if it is unknown.

    A policy module can serve several algorithms (PPO, A2C and TRPO share ActorCriticPolicy): any of them passes.
    """
    module = policy_module(zip_path)
    algos = [
        algo for algo, cls in classes.items() if module in {policy.__module__ for policy in cls.policy_aliases.values()}
    ]
    if algos and source.algo not in algos:
        raise DatasetError(
            f"{source.name} holds an agent of {' or '.join(algos)}, not of {source.algo} (its policy class is from "
            f"{module}); pass {' or '.join(f'--algo {algo}' for algo in algos)}"
        )


def same_action_space(agent: dict[str, Any], env: dict[str, Any]) -> bool:
    """Same kind, size and bounds (an agent's actions would be rescaled wrongly under other bounds)."""
    if agent["type"] != env["type"]:
        return False
    return all(
        key in agent and np.shape(agent[key]) == np.shape(env[key]) and np.allclose(agent[key], env[key])
        for key in ("n", "shape", "low", "high")
        if key in env
    )


def check_agent_spaces(zip_path: Path, env: gym.Env, source: AgentSource, env_id: str) -> None:
    env_observation = describe_space(env.observation_space)
    env_action = describe_space(env.action_space)
    try:
        agent_observation = space_from_zip(zip_path, "observation_space")
        agent_action = space_from_zip(zip_path, "action_space")
    except (zipfile.BadZipFile, KeyError, ValueError) as error:
        raise DatasetError(f"{zip_path} is not a Stable-Baselines3 agent zip: {error}") from None
    same_observations = agent_observation.get("shape") == env_observation.get("shape")
    if not same_observations or not same_action_space(agent_action, env_action):
        raise DatasetError(
            f"agent {source.name} does not fit {env_id}:\n"
            f"  agent: observation {agent_observation}, action {agent_action}\n"
            f"  env:   observation {env_observation}, action {env_action}"
        )


class GymToGymnasiumUnpickler(pickle.Unpickler):
    """Old vec_normalize.pkl files pickle `gym.spaces.*`; today the same classes live in `gymnasium.spaces`."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "gym" or module.startswith("gym."):
            module = "gymnasium" + module[len("gym") :]
        return super().find_class(module, name)


class Agent:
    """A loaded SB3 agent acting on batches of raw observations: its deterministic action, or one sampled from it."""

    def __init__(self, source: AgentSource, env_id: str):
        env = make_env_checked(env_id)
        classes = algorithm_classes()
        if source.algo not in classes:
            raise DatasetError(
                f"unknown algorithm {source.algo!r} for {source.name}; pass --algo, one of {', '.join(classes)}"
            )
        if source.path is not None:
            if source.path.is_dir():
                raise DatasetError(f"--agent-path {source.path} is a folder; give the agent's zip in it")
            if not source.path.is_file():
                raise DatasetError(f"--agent-path {source.path} does not exist")
            zip_path = source.path
            config_path, normalizer_path = (source.path.with_name(name) for name in ("config.yml", "vec_normalize.pkl"))
            config_path = config_path if config_path.is_file() else None
            normalizer_path = normalizer_path if normalizer_path.is_file() else None
        else:
            zip_path = download(source.repo_id, f"{source.repo_id.split('/')[-1]}.zip")
            config_path = download(source.repo_id, "config.yml")
            normalizer_path = download(source.repo_id, "vec_normalize.pkl", required=False)
        check_agent_algo(zip_path, source, classes)
        config = read_zoo_config(config_path)
        for unsupported in ("env_wrapper", "frame_stack"):
            if config.get(unsupported):
                raise DatasetError(
                    f"{source.name} was trained with {unsupported}={config[unsupported]}, "
                    "which this collector does not rebuild"
                )
        if needs_normalization(config) and normalizer_path is None:
            raise DatasetError(
                f"{source.name} was trained with VecNormalize (config.yml: normalize) but its vec_normalize.pkl "
                f"could not be found; download it (`hf download {source.name} vec_normalize.pkl`) "
                "or place it next to the zip"
            )
        check_agent_spaces(zip_path, env, source, env_id)

        # Old zips pickle gym spaces and schedules that no longer unpickle: give today's spaces and constant
        # schedules instead (only prediction is used, so the schedules never matter).
        constant = lambda _: 0.0  # noqa: E731
        custom_objects = {
            "observation_space": env.observation_space,
            "action_space": env.action_space,
            "learning_rate": 0.0,
            "lr_schedule": constant,
            "clip_range": constant,
            "exploration_schedule": constant,
        }
        try:
            self.model = classes[source.algo].load(zip_path, device="cpu", custom_objects=custom_objects)
        except Exception as error:  # a zip of another algorithm or an unreadable file: say which and why
            raise DatasetError(
                f"could not load {zip_path} as a {source.algo} agent: {type(error).__name__}: {error}"
            ) from None
        # The agent acts in float64 and its action is rounded to the env's dtype. In float32 the order in which a
        # matmul sums depends on the CPU's vector units, and one flipped argmax or one changed bit of a MuJoCo
        # action changes every later step: the same command built other datasets on other machines. In float64
        # those differences stay far below float32's rounding, so every machine rounds to the same action.
        import torch

        self.model.policy.double()
        for module in self.model.policy.modules():
            if isinstance(module, torch.nn.Linear):
                module.register_forward_pre_hook(lambda _, inputs: tuple(x.double() for x in inputs))
        self.action_dtype = env.action_space.dtype
        self.normalizer = None
        if normalizer_path is not None:
            try:
                with open(normalizer_path, "rb") as file:
                    self.normalizer = GymToGymnasiumUnpickler(file).load()
            except Exception as error:  # pickle raises many kinds on a truncated or foreign file
                raise DatasetError(
                    f"cannot read {normalizer_path} ({type(error).__name__}: {error}); download it again"
                ) from None
            self.normalizer.observation_space = env.observation_space
            self.normalizer.action_space = env.action_space
        self.source = source
        env.close()

    def act(self, observations: np.ndarray) -> np.ndarray:
        if self.normalizer is not None:
            observations = self.normalizer.normalize_obs(observations)
        actions, _ = self.model.predict(observations, deterministic=True)
        return actions.astype(self.action_dtype)

    def sample(self, observations: np.ndarray) -> np.ndarray:
        """An action drawn from the agent's policy for each observation, with torch's global generator."""
        if self.normalizer is not None:
            observations = self.normalizer.normalize_obs(observations)
        if getattr(self.model, "use_sde", False):
            # gSDE keeps one exploration matrix until reset_noise(): without a new one per step and per env, every
            # "sampled" action would be the same fixed function of the state.
            self.model.policy.reset_noise(len(observations))
        actions, _ = self.model.predict(observations, deterministic=False)
        return actions.astype(self.action_dtype)


# ---------------------------------------------------------------------------------------------- policies
def uniform_actions(space: gym.Space, rng: np.random.Generator, count: int) -> np.ndarray:
    if isinstance(space, gym.spaces.Discrete):
        return rng.integers(space.start, space.start + space.n, size=count)
    return rng.uniform(space.low, space.high, size=(count, *space.shape)).astype(space.dtype)


def noisy_policy(
    expert: Agent, space: gym.Space, rng: np.random.Generator, random_action_prob: float, noise_std: float
):
    """BCQ's imperfect demonstrations: a uniform action with probability p, else the expert's (plus Gaussian noise
    for Box)."""

    def act(observations: np.ndarray) -> np.ndarray:
        actions = expert.act(observations)
        count = len(observations)
        if isinstance(space, gym.spaces.Box):
            scale = noise_std * (space.high - space.low) / 2.0
            noisy = actions + scale * rng.standard_normal(actions.shape)
            actions = np.clip(noisy, space.low, space.high).astype(space.dtype)
        take_random = rng.random(count) < random_action_prob
        take_random = take_random.reshape(-1, *([1] * (actions.ndim - 1)))
        return np.where(take_random, uniform_actions(space, rng, count), actions)

    return act


# ---------------------------------------------------------------------------------------------- rollouts
def run_episodes(env_id: str, act: Callable[[np.ndarray], np.ndarray], seeds: list[int]) -> np.ndarray:
    """Undiscounted return of one episode per seed, all episodes batched in one vector env."""
    envs = make_vector_env(env_id, len(seeds))
    observations, _ = envs.reset(seed=seeds)
    returns = np.zeros(len(seeds))
    running = np.ones(len(seeds), dtype=bool)
    while running.any():
        observations, rewards, terminations, truncations, _ = envs.step(act(observations))
        returns += np.where(running, rewards, 0.0)
        running &= ~(terminations | truncations)
    envs.close()
    return returns


def collect(env_id: str, act: Callable[[np.ndarray], np.ndarray], num_transitions: int, num_envs: int, seed: int):
    """Step `num_envs` envs until `num_transitions` are stored; returns the arrays of the dataset format.

    Transitions are reordered so that each episode is contiguous: complete episodes first (in the order they
    ended), then the episodes still running when collection stopped. Such a cut episode's last stored
    transition is marked as a truncation: it did not end in a terminal state, so targets still bootstrap.
    """
    envs = make_vector_env(env_id, num_envs)
    observations, _ = envs.reset(seed=seed)
    keys = ("observations", "actions", "rewards", "next_observations", "terminations", "truncations")
    steps = {key: [] for key in keys}
    running_returns = np.zeros(num_envs)
    finished_returns: list[float] = []
    num_steps = -(-num_transitions // num_envs)
    with tqdm(total=num_steps * num_envs, desc=f"collecting {env_id}", unit="transitions", mininterval=1.0) as bar:
        for _ in range(num_steps):
            actions = act(observations)
            next_observations, rewards, terminations, truncations, infos = envs.step(actions)
            done = terminations | truncations
            real_next_observations = next_observations.copy()
            for index in np.flatnonzero(done):
                real_next_observations[index] = infos["final_obs"][index]
            values = (observations, actions, rewards, real_next_observations, terminations, truncations)
            for key, value in zip(steps, values):
                steps[key].append(np.asarray(value))
            running_returns += rewards
            finished_returns.extend(running_returns[done].tolist())
            running_returns[done] = 0.0
            observations = next_observations
            bar.update(num_envs)
            if finished_returns:
                bar.set_postfix(
                    episodes=len(finished_returns), mean_return=f"{np.mean(finished_returns):.1f}", refresh=False
                )
    envs.close()

    # Arrays are [step, env]; each transition's episode is identified by the step at which it ends (num_steps
    # for an episode still running) and the env. Sorting by (end step, env, step) makes episodes contiguous.
    stacked = {key: np.stack(value) for key, value in steps.items()}
    done = stacked["terminations"] | stacked["truncations"]
    step_index = np.broadcast_to(np.arange(num_steps)[:, None], done.shape)
    env_index = np.broadcast_to(np.arange(num_envs)[None, :], done.shape)
    episode_end = np.minimum.accumulate(np.where(done, step_index, num_steps)[::-1], axis=0)[::-1]
    order = np.lexsort((step_index.ravel(), env_index.ravel(), episode_end.ravel()))[:num_transitions]
    flat = {key: value.reshape(num_steps * num_envs, *value.shape[2:])[order] for key, value in stacked.items()}

    rewards = flat["rewards"].astype(np.float32)
    ends = np.flatnonzero(flat["terminations"] | flat["truncations"])
    starts = np.concatenate([[0], ends[:-1] + 1]).astype(np.int64)
    # reduceat's last segment runs to the end of the array: stop it at the last complete episode's end.
    episode_returns = np.add.reduceat(rewards[: ends[-1] + 1], starts) if len(ends) else np.zeros(0, np.float32)
    # Mark the cut episodes (still running at the end, or split by the num_transitions cut) as truncated.
    episode_id = (episode_end * num_envs + env_index).ravel()[order]
    last_of_episode = np.append(episode_id[1:] != episode_id[:-1], True)
    truncations = flat["truncations"] | (last_of_episode & ~flat["terminations"])

    actions = flat["actions"].astype(np.int64 if flat["actions"].ndim == 1 else np.float32)
    arrays = {
        "observations": flat["observations"].astype(np.float32),
        "actions": actions,
        "rewards": rewards,
        "next_observations": flat["next_observations"].astype(np.float32),
        "terminations": flat["terminations"].astype(bool),
        "truncations": truncations.astype(bool),
        "episode_returns": episode_returns,
    }
    return arrays


# ---------------------------------------------------------------------------------------------- main
def check_env(env_id: str) -> tuple[gym.spaces.Box, gym.Space]:
    """The env's spaces, if the dataset format can hold them."""
    env = make_env_checked(env_id)
    observation_space, action_space = env.observation_space, env.action_space
    env.close()
    if not (isinstance(observation_space, gym.spaces.Box) and len(observation_space.shape) == 1):
        raise DatasetError(f"{env_id} has observations {observation_space}; datasets hold flat vectors (a 1-D Box)")
    if not isinstance(action_space, (gym.spaces.Discrete, gym.spaces.Box)):
        raise DatasetError(f"{env_id} has actions {action_space}; only Discrete and Box are supported")
    if isinstance(action_space, gym.spaces.Box) and not (
        np.isfinite(action_space.low).all() and np.isfinite(action_space.high).all()
    ):
        raise DatasetError(f"{env_id} has unbounded actions {action_space}; random actions need finite bounds")
    return observation_space, action_space


def load_agent(source: AgentSource, env_id: str, loaded: dict[str, Agent]) -> Agent:
    """Load an agent once (the collecting agent is often the reference expert too) and say which env it knew."""
    if source.name not in loaded:
        loaded[source.name] = Agent(source, env_id)
        trained_on = source.trained_on
        if trained_on is not None and current_env_id(trained_on) != env_id:
            print(f"warning: {source.name} was trained on {trained_on}, not on {env_id}")
        elif trained_on is not None and trained_on != env_id:
            print(
                f"{source.name} was trained on {trained_on}, which today's gymnasium replaces by {env_id}: "
                "running it there"
            )
    return loaded[source.name]


def measure_reference_returns(
    env_id: str,
    action_space: gym.Space,
    reference_source: Optional[AgentSource],
    loaded: dict[str, Agent],
    episodes: int,
) -> dict[str, Any]:
    """Mean returns of a uniform random policy and of the deterministic expert, on the same seeded episodes."""
    seeds = [REFERENCE_SEED + i for i in range(episodes)]
    rng = np.random.default_rng(REFERENCE_SEED)
    random_returns = run_episodes(
        env_id, lambda observations: uniform_actions(action_space, rng, len(observations)), seeds
    )
    expert_returns = None
    if reference_source is None:
        print(f"no expert agent for {env_id}: the expert reference return is left empty (give --reference-repo-id)")
    else:
        try:
            reference_agent = load_agent(reference_source, env_id, loaded)
        except DatasetError as error:
            raise DatasetError(
                f"{error}\n(the expert reference return of {env_id} is measured with {reference_source.name}; "
                f"name another agent for it with --reference-repo-id or --reference-agent-path)"
            ) from None
        expert_returns = run_episodes(env_id, reference_agent.act, seeds)
        print(
            f"reference returns over {episodes} episodes: random {random_returns.mean():.1f}, "
            f"expert ({reference_source.name}) {expert_returns.mean():.1f} +- {expert_returns.std():.1f}"
        )
    return {
        "random": float(random_returns.mean()),
        "expert": None if expert_returns is None else float(expert_returns.mean()),
        "expert_agent": None if reference_source is None else reference_source.name,
        "episodes": episodes,
        "seeds": f"{REFERENCE_SEED} + i",
    }


def check_flags(args: Args) -> None:
    """Refuse numbers that cannot make a dataset, before any env or agent is loaded."""
    for flag in ("num_transitions", "num_envs", "reference_episodes"):
        check_range(f"--{flag.replace('_', '-')}", getattr(args, flag), 1)
    check_range("--seed", args.seed, 0)  # numpy's and gymnasium's seeds are never negative
    check_range("--random-action-prob", args.random_action_prob, 0.0, 1.0)
    check_range("--noise-std", args.noise_std, 0.0)


def main() -> None:
    args = parse_flags(Args, __doc__)
    check_flags(args)
    output = args.output or default_dataset_path(args.env_id, args.policy)
    observation_space, action_space = check_env(args.env_id)
    prepare_output(output, args.overwrite)
    import torch

    torch.set_num_threads(1)  # batched prediction of a small MLP: more threads only contend for the cores
    rng = np.random.default_rng(args.seed)
    loaded: dict[str, Agent] = {}

    collecting_source = agent_source(args.env_id, args.repo_id, args.algo, args.agent_path)
    expert, noise = None, None
    if args.policy == "random":
        act = lambda observations: uniform_actions(action_space, rng, len(observations))  # noqa: E731
    else:
        if collecting_source is None:
            raise DatasetError(
                f"{args.env_id} has no default expert; name one with --algo (sb3/<algo>-{hub_env_id(args.env_id)}), "
                f"--repo-id or --agent-path"
            )
        if args.policy == "sampled" and collecting_source.algo not in STOCHASTIC_ALGOS:
            raise DatasetError(
                f"--policy sampled draws from the agent's stochastic policy, and a {collecting_source.algo} agent "
                f"has none (it acts greedily); use an agent of {', '.join(STOCHASTIC_ALGOS)}, or --policy noisy "
                f"--random-action-prob <epsilon> for {collecting_source.algo}'s epsilon-greedy data"
            )
        expert = load_agent(collecting_source, args.env_id, loaded)
        act = expert.sample if args.policy == "sampled" else expert.act
        if args.policy == "noisy":
            noise = {"random_action_prob": args.random_action_prob}
            if isinstance(action_space, gym.spaces.Box):
                noise["gaussian_std"] = args.noise_std
            act = noisy_policy(expert, action_space, rng, args.random_action_prob, args.noise_std)

    # The expert reference is the env's default expert when it has one, so that every dataset of an env
    # (expert, medium, noisy, random) is normalised against the same score, as in D4RL.
    if args.reference_repo_id is not None or args.reference_agent_path is not None:
        reference_source = agent_source(args.env_id, args.reference_repo_id, None, args.reference_agent_path)
    else:
        reference_source = agent_source(args.env_id, None, None, None) or collecting_source
    reference_returns = measure_reference_returns(
        args.env_id, action_space, reference_source, loaded, args.reference_episodes
    )

    torch.manual_seed(args.seed)  # the sampled actions, drawn by torch.distributions from the global generator
    start = time.time()
    arrays = collect(args.env_id, act, args.num_transitions, args.num_envs, args.seed)
    collection_seconds = time.time() - start
    metadata = {
        "env_id": args.env_id,
        "policy": args.policy,
        "agent": None if expert is None else collecting_source.name,
        "algo": None if expert is None else collecting_source.algo,
        "agent_trained_on": None if expert is None else collecting_source.trained_on,
        "vec_normalize": None if expert is None else expert.normalizer is not None,
        "noise": noise,
        "gsde_reset_every_step": args.policy == "sampled" and bool(getattr(expert.model, "use_sde", False)),
        "seed": args.seed,
        "num_envs": args.num_envs,
        "num_transitions": int(len(arrays["rewards"])),
        "num_episodes": int(len(arrays["episode_returns"])),
        "observation_space": describe_space(observation_space),
        "action_space": describe_space(action_space),
        "reference_returns": reference_returns,
        "collection_seconds": round(collection_seconds, 2),
        "gymnasium_version": gym.__version__,
        "stable_baselines3_version": importlib.metadata.version("stable-baselines3"),
        "created_by": shlex.join(["python", *sys.argv]),
    }
    save_dataset(output, arrays, metadata, args.overwrite)
    returns = arrays["episode_returns"]
    mean_return = f"{returns.mean():.1f} +- {returns.std():.1f}" if len(returns) else "n/a (no complete episode)"
    print(
        f"wrote {output}: {len(arrays['rewards'])} transitions, {len(returns)} complete episodes, "
        f"mean return {mean_return}, collected in {collection_seconds:.1f} s"
    )


if __name__ == "__main__":
    exit_on_dataset_error(main)
