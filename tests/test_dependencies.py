"""Every third-party module the suite can import is declared where scripts/test.sh installs it.

The suite exercises more than tests/: it runs the package (whose integrations and memory report import
peers lazily), the benchmarks and the recipes. A peer that one of them imports but that no extra
declares passes on a machine that happens to have it and fails on a fresh one, so every import in
those trees is read here (statically, including imports inside functions) and its distribution must
be in the core dependencies or the ``test`` extra, and be installed."""
from __future__ import annotations

import ast
import importlib.metadata as md
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TREES = ("tests", "lowbit_adamw", "kernels", "benchmarks", "recipes")

# Peers the suite never imports: each is behind a guard in code no test runs. Named with the reason.
NOT_IMPORTED_BY_THE_SUITE = {
    "flashoptim": "benchmarks/step_speed.py's GPU-only peer (guarded, imported only when CUDA is available)",
}
# Import names whose distribution has another name (when the package is absent, metadata cannot tell).
DISTRIBUTION_OF = {"yaml": "pyyaml", "lightning": "lightning", "PIL": "pillow"}


def _requirement_name(req: str) -> str:
    return re.split(r"[ <>=!~;\[]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _declared() -> tuple[set[str], set[str]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {_requirement_name(r) for r in project["dependencies"]}
    test = {_requirement_name(r) for r in project["optional-dependencies"]["test"]}
    return core, test


def _local_modules() -> set[str]:
    """The package, and the scripts' sibling modules (tests, benchmarks and recipes import each other flat)."""
    names = {"lowbit_adamw", "kernels"}
    for tree in ("tests", "benchmarks", "recipes"):
        names.update(path.stem for path in (ROOT / tree).glob("*.py"))
    return names


def _imports() -> dict[str, list[str]]:
    """Top-level module name -> files that import it (absolute imports only)."""
    found: dict[str, list[str]] = {}
    for tree in TREES:
        for path in sorted((ROOT / tree).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    found.setdefault(name.split(".")[0], []).append(str(path.relative_to(ROOT)))
    return found


def _distribution(module: str) -> str | None:
    dists = md.packages_distributions().get(module)
    if dists:
        return dists[0].lower().replace("_", "-")
    return DISTRIBUTION_OF.get(module)


def third_party_imports() -> dict[str, list[str]]:
    local = _local_modules()
    return {m: files for m, files in _imports().items()
            if m not in sys.stdlib_module_names and m not in local and m != "__future__"}


def test_every_import_is_declared_in_the_test_extra():
    core, test = _declared()
    missing = []
    for module, files in sorted(third_party_imports().items()):
        if module in NOT_IMPORTED_BY_THE_SUITE:
            continue
        dist = _distribution(module)
        if dist is None or dist not in core | test:
            missing.append(f"{module} (distribution {dist or 'unknown'}; imported by {', '.join(sorted(set(files))[:3])})")
    assert not missing, ("modules the suite imports that pyproject's dependencies and [test] extra do not declare: "
                         + "; ".join(missing) + ". Add them to [project.optional-dependencies] test")


def test_the_test_extra_is_installed():
    _, test = _declared()
    absent = []
    for dist in sorted(test):
        try:
            md.version(dist)
        except md.PackageNotFoundError:
            absent.append(dist)
    assert not absent, f"declared in the [test] extra but not installed: {', '.join(absent)}: run bash scripts/test.sh (it installs '.[test]')"


def test_the_checks_see_the_lazy_imports():
    """The scan reads imports inside functions too: torchao is imported only inside the memory report."""
    found = third_party_imports()
    assert "torchao" in found and any(f.startswith("lowbit_adamw") for f in found["torchao"])
    assert "bitsandbytes" in found and "transformers" in found
