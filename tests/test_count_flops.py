"""results/count_flops.py: the FLOPs of one update of a script, counted by hand on a tiny training loop."""

import json
import subprocess
import sys

from conftest import ROOT, assert_clean_failure

COUNTER = ROOT / "results" / "count_flops.py"

# Two optimizers per update, as in the algorithms; setup before the loop and an "evaluation" after it must
# not be counted. Per update: forward of a 5x4 @ 4x3 layer (2*5*4*3 = 120 FLOPs) and its weight gradient
# (120; the input needs none), then a 5x3 @ 3x2 layer under its own optimizer: forward 60, weight gradient 60,
# and the gradient into the first layer's output 60. Total 120 + 120 + 60 + 60 + 60 = 420.
TRAINING_LOOP = """
import sys
import torch
updates = int(sys.argv[1])
first, second = torch.nn.Linear(4, 3), torch.nn.Linear(3, 2)
first_optimizer, second_optimizer = torch.optim.Adam(first.parameters()), torch.optim.Adam(second.parameters())
torch.randn(64, 64) @ torch.randn(64, 64)  # setup work
for _ in range(updates):
    loss = second(first(torch.randn(5, 4))).pow(2).mean()
    first_optimizer.zero_grad(); second_optimizer.zero_grad()
    loss.backward()
    first_optimizer.step(); second_optimizer.step()
torch.randn(100, 100) @ torch.randn(100, 100)  # evaluation after the last update
print("trained")
"""


def count(script, updates_flag: int, updates_run: int) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, COUNTER, "--updates", str(updates_flag), "--", str(script), str(updates_run)],
        capture_output=True,
        text=True,
    )


def test_counts_one_update_by_hand(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(TRAINING_LOOP)
    result = count(script, 7, 7)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == {"flops_per_update": 420.0, "optimizer_steps": 14}
    assert "trained" not in result.stdout  # the script's own output is kept out of the JSON line


def test_wrong_update_count_is_refused(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(TRAINING_LOOP)
    assert_clean_failure(count(script, 3, 7), "14 optimizer steps for 3 updates")


def test_uneven_updates_as_a_delayed_actor(tmp_path):
    # The second optimizer steps every other update (TD3's delayed actor): 7 updates make 7 + 4 optimizer steps.
    script = tmp_path / "train.py"
    script.write_text(
        TRAINING_LOOP.replace(
            "first_optimizer.step(); second_optimizer.step()",
            "first_optimizer.step()\n    if _ % 2 == 0: second_optimizer.step()",
        )
    )
    assert_clean_failure(count(script, 7, 7), "11 optimizer steps for 7 updates", "--uneven")
    result = subprocess.run(
        [sys.executable, COUNTER, "--updates", "7", "--uneven", "--", str(script), "7"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {"flops_per_update": 420.0, "optimizer_steps": 11}
