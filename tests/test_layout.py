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


def test_files_stay_small():
    long = {str(p.relative_to(ROOT)): n for d in ("samsr", "pipelines", "tests", "benchmarks")
            for p in (ROOT / d).rglob("*.py") if (n := len(p.read_text().splitlines())) > 400}
    assert long == {}
