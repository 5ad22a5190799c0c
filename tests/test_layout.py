"""House rules that keep the layout honest: samsr/ is a Ray-free library; presets ship in the package."""
import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_library_never_imports_ray_or_pipelines():
    offenders = {}
    for path in sorted((ROOT / "samsr").rglob("*.py")):
        bad = _imported_modules(path) & {"ray", "pipelines", "mlflow"}
        if bad:
            offenders[str(path.relative_to(ROOT))] = sorted(bad)
    assert offenders == {}


def test_importing_the_library_loads_no_ray():
    code = ("import sys, importlib, pkgutil, samsr\n"
            "for m in pkgutil.walk_packages(samsr.__path__, 'samsr.'): importlib.import_module(m.name)\n"
            "print('ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "False"


def test_the_mlflow_model_code_loads_no_ray():
    """A served model (pipelines/tracking/model.py + entry.py, carried as code_paths) needs no Ray."""
    code = "import sys, pipelines.tracking.model, pipelines.tracking.client\nprint('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "False"


def test_files_stay_small():
    long = {str(p.relative_to(ROOT)): n for d in ("samsr", "pipelines", "tests", "benchmarks")
            for p in (ROOT / d).rglob("*.py") if (n := len(p.read_text().splitlines())) > 400}
    assert long == {}


def _module_imports(path: Path, package_root: Path) -> set[str]:
    """Modules of our packages that `path` imports anywhere (an import inside a function counts: a lazy
    import that hides a cycle is still a cycle), each with the packages above it (a.b runs a/__init__)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] not in ("samsr", "pipelines"):
                continue
            for i in range(1, len(parts) + 1):
                target = package_root.joinpath(*parts[:i])
                if target.with_suffix(".py").is_file() or (target / "__init__.py").is_file():
                    found.add(".".join(parts[:i]))
    return found


def test_no_import_cycles():
    """samsr/ and pipelines/ depend on each other as a tree: no module imports one that imports it back."""
    graph = {}
    for path in [*(ROOT / "samsr").rglob("*.py"), *(ROOT / "pipelines").rglob("*.py")]:
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        # a package's own __init__ is already running when its modules import it: not an edge
        graph[name] = {m for m in _module_imports(path, ROOT) if not (name + ".").startswith(m + ".")}
    cycles, state = [], {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(trail[trail.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = "done"

    for start in sorted(graph):
        if start not in state:
            visit(start, [start])
    assert cycles == []


# runtime dependencies our own code does not import, each for a reason
IMPORTED_BY_OTHERS = {"torchvision": "segment-anything imports it without declaring it",
                      "psutil": "MLflow's system metrics monitor (samsr train's system/*)"}


def test_every_runtime_dependency_is_imported_by_runtime_code():
    import importlib.metadata
    import re
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {re.split(r"[\[<>=!~ ;]", d, maxsplit=1)[0].lower().replace("_", "-") for d in deps}
    imported = set().union(*(_imported_modules(p) for d in ("samsr", "pipelines") for p in (ROOT / d).rglob("*.py")))
    provided = importlib.metadata.packages_distributions()
    used = {dist.lower().replace("_", "-") for module in imported for dist in provided.get(module, [])}
    assert names - used - set(IMPORTED_BY_OTHERS) == set()
    assert set(IMPORTED_BY_OTHERS) <= names
