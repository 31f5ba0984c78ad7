"""Every neural-network script is laid out the same way: its algorithm first, then one run-bookkeeping block that is
the same, byte for byte, in every one, then a short main. And each script of algorithms/ stands alone: it imports
nothing from this repository, and nothing outside tests/ imports it."""

import ast
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ALL_SCRIPTS = sorted((ROOT / "algorithms").glob("*.py"))
# tabular_maze.py has no dataset file, no torch and no run bookkeeping: a Q-table, not a network.
SCRIPTS = [path for path in ALL_SCRIPTS if path.stem != "tabular_maze"]
START = "# ---- run bookkeeping: the same in every script of algorithms/ ----\n"
END = "# ---- end of run bookkeeping ----\n"


def parts(path: Path) -> tuple[str, str, str]:
    """The algorithm, the bookkeeping block (markers included) and the main of a script."""
    text = path.read_text()
    assert text.count(START) == 1 and text.count(END) == 1, f"{path.name}: one start and one end marker each"
    algorithm, rest = text.split(START)
    block, main = rest.split(END)
    return algorithm, START + block + END, main


def test_all_seven_scripts_and_the_maze_are_there():
    names = {path.stem for path in ALL_SCRIPTS}
    assert names == {
        "tabular_maze",
        "bc",
        "bcq_continuous",
        "bcq_discrete",
        "cql_discrete_lunarlander",
        "cql_sac_continuous",
        "iql",
        "td3_bc",
    }


def test_the_bookkeeping_block_is_the_same_in_every_script():
    blocks = {path.name: parts(path)[1] for path in SCRIPTS}
    reference = blocks["td3_bc.py"]
    for name, block in blocks.items():
        if block != reference:
            differ = next(i for i, (a, b) in enumerate(zip(block.splitlines(), reference.splitlines()), 1) if a != b)
            pytest.fail(f"{name}'s bookkeeping block differs from td3_bc.py's at its line {differ}")


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda path: path.stem)
def test_the_algorithm_comes_first_and_main_is_short(path):
    algorithm, block, main = parts(path)
    defined = {node.name for node in ast.parse(algorithm).body if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
    assert {"AlgorithmArgs", "check_flags", "update", "ActingPolicy"} <= defined, defined
    assert re.search(r"^ACTION_KIND = \"(discrete|box|both)\"", algorithm, re.M)
    assert re.search(r"^DATASET_KEYS = \(", algorithm, re.M)
    # The block defines no algorithm; main builds the networks and runs the loop.
    block_defined = {node.name for node in ast.parse(block).body if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
    assert not block_defined & defined, block_defined & defined
    assert main.lstrip().startswith('if __name__ == "__main__":') and len(main.strip().splitlines()) <= 60
    update = next(node for node in ast.parse(algorithm).body if getattr(node, "name", None) == "update")
    assert update.end_lineno - update.lineno + 1 <= 80, "update() is one gradient step: at most 80 lines"


@pytest.mark.parametrize("path", ALL_SCRIPTS, ids=lambda path: path.stem)
def test_a_script_imports_nothing_from_this_repository(path):
    ours = {script.stem for script in ALL_SCRIPTS} | {module.stem for module in (ROOT / "data_collection").glob("*.py")}
    ours |= {"algorithms", "data_collection", "results", "tests", "conftest"}
    imported = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0])
    assert not imported & ours, imported & ours
    assert "sys.path" not in path.read_text()


def test_nothing_outside_tests_imports_an_algorithm_script():
    scripts = {script.stem for script in ALL_SCRIPTS}
    # check_reuse.py reads a script's Args to compare a record's flags with today's defaults: that is all it takes.
    allowed = {ROOT / "results" / "check_reuse.py"}
    for path in [*(ROOT / "results").glob("*.py"), *(ROOT / "data_collection").glob("*.py")]:
        if path in allowed:
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = (
                [alias.name for alias in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            assert not {name.split(".")[0] for name in names} & scripts, f"{path.name} imports {names}"
        assert "spec_from_file_location" not in path.read_text(), f"{path.name} loads a file as a module"


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
