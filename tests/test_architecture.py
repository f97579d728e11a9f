"""The package's import structure: no cycles, lazy imports included (a cycle dodged with a function-level import
is still a cycle), and the package's top level loads neither torch nor transformers.

Read from the source with :mod:`ast`, so every import counts, including those inside functions that a test run
might never execute. ``if TYPE_CHECKING:`` blocks are left out: they never run.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "src" / "rlhf_rewards"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST, module: str, is_package: bool, modules: set[str]) -> set[str]:
    """The package modules ``module`` imports anywhere in its source (``from . import x`` counts as ``x``)."""
    found: set[str] = set()
    package = module if is_package else module.rpartition(".")[0]

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "rlhf_rewards")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] == "rlhf_rewards":
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    found.add(sub if sub in modules else target)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    found.discard(module)
    return found


def import_graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        tree = ast.parse(path.read_text(), str(path))
        graph[name] = {m for m in _imports(tree, name, path.name == "__init__.py", set(files)) if m in files}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle as a list of modules (first repeated at the end), or ``[]``."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(node: str) -> list[str]:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = dfs(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if node not in state:
            cycle = dfs(node)
            if cycle:
                return cycle
    return []


def test_the_graph_reader_sees_lazy_imports_and_cycles():
    source = "def f():\n    from .b import g\n"
    assert _imports(ast.parse(source), "rlhf_rewards.a", False, {"rlhf_rewards.b"}) == {"rlhf_rewards.b"}
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_in_the_package():
    assert find_cycle(import_graph()) == []


def test_the_floor_imports_nothing_from_the_package():
    graph = import_graph()
    for floor in ("rlhf_rewards.errors", "rlhf_rewards.transforms"):
        assert graph[floor] == set(), floor


def test_top_level_import_and_help_load_no_torch():
    env = {**os.environ, "PYTHONPATH": str(PACKAGE.parent)}
    code = ("import sys, rlhf_rewards\n"
            "from rlhf_rewards.cli import build_parser\n"
            "build_parser().format_help()\n"
            "heavy = [m for m in ('torch', 'transformers', 'httpx', 'fastapi') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def _backend_private_names() -> set[str]:
    """Every underscore name the backends' classes define (methods and attributes set on ``self``)."""
    names: set[str] = set()
    for path in (PACKAGE / "backends").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("_"):
                names.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self" \
                    and node.attr.startswith("_"):
                names.add(node.attr)
    return {n for n in names if not (n.startswith("__") and n.endswith("__"))}


def private_uses_outside_backends() -> list[str]:
    """``module:line: what`` for each import of a private name from another package module, and each use of a name
    private to the backends' classes on anything but ``self``, in the package outside ``backends/``."""
    private = _backend_private_names()
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if "backends" in path.relative_to(PACKAGE).parts:
            continue
        where = path.relative_to(PACKAGE.parent)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("rlhf_rewards")):
                found += [f"{where}:{node.lineno}: imports {a.name}" for a in node.names
                          if a.name.startswith("_") and not a.name.startswith("__")]
            elif isinstance(node, ast.Attribute) and node.attr in private and \
                    not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")) and \
                    not (isinstance(node.value, ast.Call) and getattr(node.value.func, "id", "") == "super"):
                found.append(f"{where}:{node.lineno}: uses .{node.attr}")
    return found


def test_nothing_above_the_backends_reaches_into_a_model():
    assert private_uses_outside_backends() == []


FLOORS = (
    # 0: facts and numbers, no model
    ("rlhf_rewards", "errors", "transforms", "stats", "presets", "groups", "sources", "conversation", "rewardbench",
     "normalization"),
    # 1: text and inputs: parsing, rendering, tokenizing, batching, reward-function options
    ("chat_parsing", "policy_text", "rendering", "tokenization", "control_text", "batching", "reward_options"),
    # 2: the models
    ("backends", "packing_check", "loading"),
    # 3: built on any model through its per-sample protocol; tiny checkpoints
    ("pairwise", "testing"),
    # 4: TRL adapters
    ("trainers",),
    # 5: the server and its clients
    ("serving",),
    # 6: other RL frameworks' reward-function shapes, through the clients
    ("integrations",),
    # 7: the command line
    ("cli", "__main__"),
)
"""docs/architecture.md's floors, by top-level name under ``rlhf_rewards``: a module imports only from its own floor
or the floors below it."""


def floor_of(module: str) -> int:
    parts = module.split(".")
    name = parts[1] if len(parts) > 1 else "rlhf_rewards"
    for level, names in enumerate(FLOORS):
        if name in names:
            return level
    raise AssertionError(f"{module} is on no floor: add it to FLOORS and to docs/architecture.md")


def test_imports_run_one_way_down_the_floors():
    upward = [f"{a} (floor {floor_of(a)}) imports {b} (floor {floor_of(b)})"
              for a, targets in sorted(import_graph().items()) for b in sorted(targets) if floor_of(b) > floor_of(a)]
    assert upward == []


def test_the_floors_are_the_documented_ones():
    doc = (ROOT / "docs" / "architecture.md").read_text()
    for level, names in enumerate(FLOORS):
        row = next((line for line in doc.splitlines() if line.startswith(f"| {level} |")), "")
        for name in names:
            assert f"`{name}`" in row, f"docs/architecture.md: floor {level} should list `{name}`"


def test_the_clients_load_neither_torch_nor_the_models():
    env = {**os.environ, "PYTHONPATH": str(PACKAGE.parent)}
    code = ("import sys\n"
            "import rlhf_rewards.serving.client, rlhf_rewards.serving.ray_client\n"
            "heavy = [m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')\n"
            "         or m.startswith(('rlhf_rewards.backends', 'rlhf_rewards.trainers'))]\n"
            "assert not heavy, heavy\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
