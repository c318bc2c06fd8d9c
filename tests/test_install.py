"""Every package src/ imports is declared in pyproject.toml (a fresh venv installs only what is declared).

The image's own site-packages once hid an undeclared scipy: the README's first command then failed on a
user's brand-new venv. The check is static, so it also fails where the package is not installed at all."""
from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared() -> set[str]:
    proj = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(proj["dependencies"]) + [r for extra in proj.get("optional-dependencies", {}).values() for r in extra]
    return {_norm(re.split(r"[\s<>=!~;\[(]", r, maxsplit=1)[0]) for r in reqs}


def imported(src: Path) -> dict[str, str]:
    """Top-level module -> the first file that imports it statically (importlib calls are the guarded
    optional backends, which say how to install themselves)."""
    own = {p.name for p in src.iterdir() if p.is_dir()}
    found: dict[str, str] = {}
    for f in sorted(src.rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else [])
            for n in names:
                top = n.split(".")[0]
                if top not in sys.stdlib_module_names and top not in own and top != "__future__":
                    found.setdefault(top, str(f.relative_to(src.parent)))
    return found


def undeclared(src: Path, decl: set[str]) -> list[str]:
    dists = packages_distributions()
    bad = []
    for mod, where in sorted(imported(src).items()):
        names = {_norm(d) for d in dists.get(mod, [])} | {_norm(mod)}
        if not names & decl:
            bad.append(f"{mod} (imported in {where})")
    return bad


def test_every_package_src_imports_is_declared():
    assert undeclared(ROOT / "src", declared()) == []


def test_the_check_catches_an_undeclared_and_an_uninstalled_import(tmp_path):
    pkg = tmp_path / "src" / "p"
    pkg.mkdir(parents=True)
    (pkg / "a.py").write_text("import json\nimport numpy\nfrom scipy.stats import norm\nimport not_a_real_pkg_xyz\nfrom . import b\n")
    bad = undeclared(tmp_path / "src", {"numpy"})
    assert [b.split()[0] for b in bad] == ["not_a_real_pkg_xyz", "scipy"]


@pytest.mark.slow
def test_readme_first_command_in_a_fresh_venv_ends_done(tmp_path):
    """The README's first command, as a new user runs it: a brand-new venv (no --system-site-packages, so
    the image's own packages cannot hide a missing one), pip from the wheel cache, then `just fast-dev-run`
    in a clean copy of the tracked files, which must end with a run whose status is done."""
    readme = (ROOT / "README.md").read_text()
    command = re.search(r"```bash\n(python -m pip install [^\n]*fast-dev-run)\n```", readme).group(1)
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    repo = tmp_path / "clone"
    for rel in filter(None, tracked.decode().split("\0")):
        if (ROOT / rel).is_file():
            (repo / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, repo / rel)
    venv = tmp_path / "venv"
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PREFECT_HOME", "PREFECT_API_URL") and not k.startswith("PYTEST")}
    env.update(PATH=f"{venv / 'bin'}:{env['PATH']}", VIRTUAL_ENV=str(venv), XDG_CACHE_HOME=str(tmp_path / "cache"))
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    done = subprocess.run(["bash", "-c", command], cwd=repo, env=env, capture_output=True, text=True, timeout=1800)
    took = time.time() - t0
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-3000:])
    run_id = done.stdout.strip().splitlines()[-1]
    status = [json.loads(line) for line in (repo / "out" / "runs" / run_id / "status.jsonl").read_text().splitlines()]
    assert status[-1]["status"] == "done", status
    print(f"fresh venv to a done fast-dev run: {took:.0f} s")
