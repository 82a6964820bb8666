"""The package layout: kernels/ and converters/ import only as energon_hf.kernels / .converters."""

import subprocess
import sys
from pathlib import Path

import energon_hf

REPO = Path(__file__).resolve().parents[1]


def test_folders_map_into_the_package():
    import energon_hf.converters
    import energon_hf.kernels

    assert Path(energon_hf.kernels.__file__).parent == REPO / "kernels"
    assert Path(energon_hf.converters.__file__).parent == REPO / "converters"


def test_no_bare_kernels_module(tmp_path):
    """A bare `kernels` is HF's hub-kernels distribution (a dependency of transformers since 5.25), which
    transformers imports; we must never provide it: where it resolves at all, it is not our folder."""
    code = ("import importlib.util, transformers, energon_hf.kernels;"
            "from transformers.utils.import_utils import is_kernels_available;"
            "spec = importlib.util.find_spec('kernels');"
            "is_kernels_available(); print(spec.origin if spec else None)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    origin = out.stdout.strip()
    assert origin == "None" or not Path(origin).is_relative_to(REPO / "kernels")


def test_public_api():
    assert callable(energon_hf.EnergonModel.from_pretrained)
    assert energon_hf.__version__


def _imported_modules(path: Path, package: str) -> set[str]:
    """Every module a file imports, with relative imports resolved against its package."""
    import ast

    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join([*base, node.module] if node.module else base)
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def test_models_and_layers_never_import_the_engine():
    """The layers depend on the shared types below the engine (energon_hf.batch, .kv_cache), not upward."""
    for folder in ("nn", "models"):
        for path in (REPO / "energon_hf" / folder).glob("*.py"):
            upward = {m for m in _imported_modules(path, f"energon_hf.{folder}")
                      if m == "energon_hf.engine" or m.startswith("energon_hf.engine.")}
            assert not upward, f"{path.relative_to(REPO)} imports {sorted(upward)}"
