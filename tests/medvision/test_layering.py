"""Dependencies point one way: core imports neither training nor serving; serving never imports torch."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HEAVY = {"torch", "torchvision", "timm", "monai", "albumentations", "safetensors", "onnx", "onnxscript", "sklearn"}


def imported_modules(folder: Path):
    for path in folder.rglob("*.py"):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    yield path, alias.name
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                yield path, node.module
            elif isinstance(node, ast.Call) and getattr(node.func, "id", "") == "__import__" and node.args:
                arg = node.args[0]
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    yield path, arg.value


def test_core_never_imports_training_or_serving():
    bad = [(p.name, m) for p, m in imported_modules(ROOT / "medvision")
           if m.startswith(("medvision.training", "medvision.serving", "training", "serving"))]
    assert not bad


@pytest.mark.parametrize("folder", ["medvision", "serving"])
def test_core_and_serving_never_import_torch_and_friends(folder):
    bad = [(p.name, m) for p, m in imported_modules(ROOT / folder) if m.split(".")[0] in HEAVY]
    assert not bad


def test_serving_imports_and_builds_with_torch_unimportable(artifact):
    code = (
        "import sys\n"
        f"for name in {sorted(HEAVY)!r}: sys.modules[name] = None\n"  # any 'import torch' now raises ImportError
        "from fastapi.testclient import TestClient\n"
        "from medvision.serving.app import create_app\n"
        "from medvision.serving.settings import Settings\n"
        f"with TestClient(create_app(Settings(artifact={str(artifact)!r}))) as c:\n"
        "    assert c.get('/readyz').json()['status'] == 'ready'\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr


def test_training_and_serving_are_not_top_level_modules():
    proc = subprocess.run([sys.executable, "-c", "import training"], capture_output=True, text=True, cwd="/")
    assert proc.returncode != 0
    proc = subprocess.run([sys.executable, "-c", "import serving"], capture_output=True, text=True, cwd="/")
    assert proc.returncode != 0
