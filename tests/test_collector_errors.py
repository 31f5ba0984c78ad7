"""Each user mistake gives one clear message, a non-zero exit and no traceback, and overwrites nothing."""

from __future__ import annotations

import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from conftest import COLLECTOR, add_to_hub_cache, offline_env, run_script, write_zoo_config
from conftest import assert_clean_failure as assert_failure


def assert_clean_failure(result, *fragments):
    assert_failure(result, *fragments, returncode=2)  # the collectors exit with 2 on a user mistake


@pytest.mark.parametrize(
    ("env_id", "hint"),
    [("NoSuchEnv-v0", "unknown env id"), ("LunarLander-v2", "LunarLander-v3"), ("CartPol-v1", "CartPole-v1")],
)
def test_unknown_env_id(hub_cache, tmp_path, env_id, hint):
    result = run_script(COLLECTOR, ["--env-id", env_id, "--output", tmp_path / "x.npz"], offline_env(hub_cache))
    assert_clean_failure(result, hint)


def test_agent_spaces_do_not_match_env(agents, hub_cache, tmp_path):
    result = run_script(
        COLLECTOR,
        [
            "--env-id",
            "Acrobot-v1",
            "--agent-path",
            agents["cartpole"] / "ppo-CartPole-v1.zip",
            "--output",
            tmp_path / "x.npz",
        ],
        offline_env(hub_cache),
    )
    # Both shapes are printed: CartPole's 4 observations and 2 actions, Acrobot's 6 and 3.
    assert_clean_failure(result, "does not fit Acrobot-v1", "'shape': [4]", "'n': 2", "'shape': [6]", "'n': 3")
    assert not (tmp_path / "x.npz").exists()


def test_action_spaces_compare_kind_size_and_bounds():
    from collect_dataset import same_action_space

    box = {"type": "Box", "shape": [1], "low": [-2.0], "high": [2.0]}
    assert same_action_space(box, dict(box))
    assert not same_action_space(box, {"type": "Box", "shape": [1], "low": [-1.0], "high": [1.0]})
    assert not same_action_space(box, {"type": "Box", "shape": [2], "low": [-2.0, -2.0], "high": [2.0, 2.0]})
    assert not same_action_space(box, {"type": "Discrete", "n": 2})
    assert not same_action_space({"type": "Discrete", "n": 3}, {"type": "Discrete", "n": 2})


@pytest.fixture(scope="module")
def fake_hub():
    """A local HTTP server answering like the Hub: 404 with X-Error-Code RepoNotFound or EntryNotFound."""

    class Handler(BaseHTTPRequestHandler):
        def answer(self):
            code = "RepoNotFound" if "/sb3/ppo-NoSuchRepo" in self.path else "EntryNotFound"
            self.send_response(404)
            self.send_header("X-Error-Code", code)
            self.send_header("X-Error-Message", f"{code} (fake hub)")
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_HEAD = answer

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def online_env(endpoint, cache):
    env = {key: value for key, value in os.environ.items() if key != "HF_HUB_OFFLINE"}
    return dict(
        env,
        HF_ENDPOINT=endpoint,
        HF_HUB_CACHE=str(cache),
        NO_PROXY="127.0.0.1,localhost",
        no_proxy="127.0.0.1,localhost",
    )


def test_hub_repo_not_found(fake_hub, tmp_path):
    result = run_script(
        COLLECTOR,
        ["--env-id", "CartPole-v1", "--repo-id", "sb3/ppo-NoSuchRepo", "--output", tmp_path / "x.npz"],
        online_env(fake_hub, tmp_path / "cache"),
    )
    assert_clean_failure(result, "Hub repo sb3/ppo-NoSuchRepo not found")


def test_hub_file_not_found(fake_hub, tmp_path):
    result = run_script(
        COLLECTOR,
        ["--env-id", "CartPole-v1", "--algo", "ppo", "--output", tmp_path / "x.npz"],
        online_env(fake_hub, tmp_path / "cache"),
    )
    assert_clean_failure(result, "sb3/ppo-CartPole-v1 has no file ppo-CartPole-v1.zip")


def test_offline_with_nothing_cached(tmp_path):
    result = run_script(
        COLLECTOR,
        ["--env-id", "CartPole-v1", "--algo", "ppo", "--output", tmp_path / "x.npz"],
        offline_env(tmp_path / "empty-cache"),
    )
    assert_clean_failure(result, "not in the local Hub cache", "hf download sb3/ppo-CartPole-v1", "--agent-path")


def test_normalised_agent_without_its_vec_normalize(agents, tmp_path):
    cache = tmp_path / "cache"
    write_zoo_config(tmp_path / "config.yml", normalize=True)
    add_to_hub_cache(
        cache,
        "sb3/ppo-Pendulum-v1",
        {
            "ppo-Pendulum-v1.zip": agents["pendulum"] / "ppo-Pendulum-v1.zip",
            "config.yml": tmp_path / "config.yml",
        },
    )
    result = run_script(
        COLLECTOR, ["--env-id", "Pendulum-v1", "--algo", "ppo", "--output", tmp_path / "x.npz"], offline_env(cache)
    )
    assert_clean_failure(result, "trained with VecNormalize", "vec_normalize.pkl")


def test_output_folder_not_writable(hub_cache, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = run_script(
        COLLECTOR,
        ["--env-id", "CartPole-v1", "--policy", "random", "--output", blocker / "sub" / "x.npz"],
        offline_env(hub_cache),
    )
    assert_clean_failure(result, "cannot write to the folder", "choose another --output")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_output_folder_without_write_permission(hub_cache, tmp_path):
    folder = tmp_path / "read-only"
    folder.mkdir(mode=0o500)
    result = run_script(
        COLLECTOR,
        ["--env-id", "CartPole-v1", "--policy", "random", "--output", folder / "x.npz"],
        offline_env(hub_cache),
    )
    assert_clean_failure(result, "cannot write to the folder")


def test_existing_dataset_is_kept_without_overwrite(hub_cache, tmp_path):
    output = tmp_path / "x.npz"
    output.write_bytes(b"precious")
    result = run_script(
        COLLECTOR, ["--env-id", "CartPole-v1", "--policy", "random", "--output", output], offline_env(hub_cache)
    )
    assert_clean_failure(result, "already exists", "--overwrite")
    assert output.read_bytes() == b"precious"
    result = run_script(
        COLLECTOR,
        [
            "--env-id",
            "CartPole-v1",
            "--policy",
            "random",
            "--num-transitions",
            50,
            "--reference-episodes",
            1,
            "--output",
            output,
            "--overwrite",
        ],
        offline_env(hub_cache),
    )
    assert result.returncode == 0, result.stderr
    assert output.read_bytes() != b"precious"
    assert [path.name for path in tmp_path.iterdir()] == ["x.npz"], "no temporary file is left behind"


@pytest.mark.parametrize(
    ("env_id", "source", "algo"), [("CartPole-v1", "local zip", "dqn"), ("Pendulum-v1", "hub", "sac")]
)
def test_algo_that_does_not_match_the_zip(agents, hub_cache, tmp_path, env_id, source, algo):
    # Both tiny agents are PPO's, whose policy class (ActorCriticPolicy) A2C and TRPO share.
    if source == "local zip":
        agent = ["--agent-path", agents["cartpole"] / "ppo-CartPole-v1.zip"]
    else:
        agent = ["--repo-id", "sb3/ppo-Pendulum-v1"]
    result = run_script(
        COLLECTOR,
        [
            "--env-id",
            env_id,
            *agent,
            "--algo",
            algo,
            "--num-transitions",
            50,
            "--reference-episodes",
            1,
            "--output",
            tmp_path / "x.npz",
        ],
        offline_env(hub_cache),
    )
    assert_clean_failure(result, f"not of {algo}", "stable_baselines3.common.policies", "--algo ppo")
    assert len([line for line in result.stderr.splitlines() if line.startswith("error:")]) == 1, result.stderr
    assert list(tmp_path.iterdir()) == [], "nothing is written"


@pytest.mark.parametrize("algo", ["dqn", "td3"])
def test_sampled_needs_an_agent_with_a_stochastic_policy(hub_cache, tmp_path, algo):
    result = run_script(
        COLLECTOR,
        ["--env-id", "CartPole-v1", "--policy", "sampled", "--algo", algo, "--output", tmp_path / "x.npz"],
        offline_env(hub_cache),
    )
    assert_clean_failure(result, f"a {algo} agent has none", "--policy noisy")
    assert not (tmp_path / "x.npz").exists()
