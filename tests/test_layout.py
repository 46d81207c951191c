"""The package's shape: imports run one way (no cycle, function-local imports included), and every command
answers --help with a description and exit 0. (Small modules are a guideline of the design, not a test: a line cap
made code worse by squeezing it.)"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "fastcifar"


def _imports(path: Path) -> set[str]:
    """The fastcifar modules that `path` imports anywhere in its code (also inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("fastcifar.")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "fastcifar":
            if node.module == "fastcifar":  # from fastcifar import rundir: the submodule
                found |= {f"fastcifar.{a.name}" for a in node.names if (PACKAGE / f"{a.name}.py").exists()}
            else:
                found.add(node.module)
    return found


def _graph() -> dict[str, set[str]]:
    modules = {f"fastcifar.{p.stem}": p for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    return {name: _imports(path) & modules.keys() for name, path in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_in_the_package():
    cycle = _cycle(_graph())
    assert cycle is None, " -> ".join(cycle)


def test_the_bottom_layer_imports_nothing_above_it():
    bottom = {"fastcifar.errors", "fastcifar.config", "fastcifar.presets", "fastcifar.rundir", "fastcifar.runfiles",
              "fastcifar.interrupt", "fastcifar.distributed", "fastcifar.runtime", "fastcifar.allocator",
              "fastcifar._launch"}
    graph = _graph()
    for module in bottom:
        assert graph[module] <= bottom, (module, graph[module] - bottom)


COMMANDS = ["fastcifar.train", "fastcifar.find_lr", "fastcifar.evaluate", "fastcifar.report", "fastcifar.compare",
            "fastcifar.seeds", "fastcifar.sweep", "fastcifar.custom_resnet", "fastcifar.calibrate"]


@pytest.mark.slow
@pytest.mark.parametrize("module", COMMANDS)
def test_every_command_answers_help_with_a_description(module):
    proc = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=300,
                          cwd=PACKAGE.parent)
    assert proc.returncode == 0, proc.stderr
    usage, _, rest = proc.stdout.partition("\n\n")
    prog = "python -m fastcifar.seeds" if module == "fastcifar.sweep" else "python -m " + module  # its old name
    assert usage.startswith("usage: " + prog) and rest.strip(), proc.stdout
