"""The layout docs/architecture.md describes holds: stages import no store, runner or flow; no module
over ~400 lines; no import cycles inside the package."""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "src" / "steer_heal"
STAGES = ("extract", "dose", "generate", "filter", "heal", "bake", "evaluate", "mfv", "contrast", "freetext", "steering",
          "intervals", "metrics")
ABOVE = ("store", "run", "flow", "student", "diag", "cli", "report", "export", "bench", "sweep")
MAX_LINES = 420


def _module(path: Path) -> str:
    return ".".join(p for p in path.relative_to(PKG).with_suffix("").parts if p != "__init__")


MODULES = {_module(p): p for p in PKG.rglob("*.py")}


def imports(path: Path, top_only: bool = False) -> set[str]:
    """Package modules that `path` imports (relative imports resolved); top_only: module-level ones only
    (an import inside a function runs late and cannot make a loading cycle)."""
    mod = _module(path).split(".")
    pkg = mod if path.name == "__init__.py" else mod[:-1]
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_only else list(ast.walk(tree))
    out = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg[: len(pkg) - node.level + 1]
                target = ".".join([*base, *(node.module or "").split(".")]).strip(".")
            elif (node.module or "").startswith("steer_heal"):
                target = node.module.removeprefix("steer_heal").lstrip(".")
            else:
                continue
            out |= {target} | {f"{target}.{a.name}".strip(".") for a in node.names}
        elif isinstance(node, ast.Import):
            out |= {a.name.removeprefix("steer_heal").lstrip(".") for a in node.names if a.name.startswith("steer_heal")}
    return {m for m in out if m in MODULES}


def test_stages_import_no_store_runner_or_flow():
    for stage in STAGES:
        bad = {m for m in imports(PKG / f"{stage}.py") if m.split(".")[0] in ABOVE}
        assert not bad, f"stage module {stage}.py imports {sorted(bad)}"


def test_no_module_is_over_400_lines():
    long = {m: n for m, p in MODULES.items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long


def test_no_import_cycles_at_module_level():
    graph = {m: imports(p, top_only=True) for m, p in MODULES.items()}
    done: set[str] = set()

    def visit(m: str, path: list[str]) -> None:
        if m in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(m):] + [m]))
        if m in done:
            return
        for n in graph[m]:
            if not m.startswith(n + ".") and n:  # a submodule importing its own package is no cycle
                visit(n, path + [m])
        done.add(m)

    for m in graph:
        visit(m, [])


def test_store_imports_no_config_and_nothing_above_it():
    """The store sits near the ground (issue 26 item 4): its errors come from errors.py, its SQL table from
    tables.py, so it reads a run's files without config, a stage, the report or the runner."""
    for m, p in MODULES.items():
        if m.split(".")[0] != "store":
            continue
        bad = {n for n in imports(p) if n.split(".")[0] in {*ABOVE, *STAGES, "config"} - {"store", "intervals"}}
        assert not bad, f"{m} imports {sorted(bad)}"


MAX_FUNCTION_LINES = 80


def test_no_function_is_over_80_lines():
    """A function longer than a screen hides its steps: split it (issue 26). Counted from `def` to its last
    line, nested functions inside their parent's count."""
    long = {}
    for m, p in MODULES.items():
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long[f"{m}.{node.name}"] = n
    assert not long, long
