"""dptr_common is shared with the sidecar, which must stay small: no kopf, no kubernetes.

And the layering of modules: render_staging imports nothing of render (render builds
the Job and uses render_staging, one way), and the operator is a stack whose modules
import only the layers below them.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import dptr_common

MODULES = ["errors", "models", "naming", "pacing", "render", "render_staging", "task"]
FORBIDDEN = ("kopf", "kubernetes")


@pytest.mark.parametrize("module", MODULES)
def test_module_does_not_import_kopf_or_kubernetes(module: str) -> None:
    code = (
        "import json, sys\n"
        f"import dptr_common.{module}\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {'kopf', 'kubernetes', 'boto3'})))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    loaded = json.loads(result.stdout)
    assert not [m for m in loaded if m.split(".")[0] in FORBIDDEN], loaded
    # botocore is allowed but loaded lazily; boto3 is never needed here.
    assert "boto3" not in loaded


def _imports_in(source: str, package: str = "dptr_common") -> set[str]:
    """Every module a module of ``package`` names in an import, anywhere in ``source``.

    Top level, inside functions, under ``if TYPE_CHECKING:``, in ``try``: every
    ``import``/``from ... import`` statement (relative ones resolved against
    ``package``), plus ``importlib.import_module("...")`` / ``__import__("...")`` with a
    literal name.  For ``from pkg import name`` both ``pkg`` and ``pkg.name`` count,
    since ``name`` may be a submodule.
    """
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0]
                origin = f"{base}.{node.module}" if node.module else base
            else:
                origin = node.module or ""
            found.add(origin)
            found.update(f"{origin}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name in {"import_module", "__import__"} and node.args:
                first = node.args[0]
                if isinstance(first, ast.Constant) and isinstance(first.value, str):
                    found.add(first.value)
    return found


def test_the_import_scan_sees_every_form() -> None:
    source = (
        "from __future__ import annotations\n"
        "import importlib\n"
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from dptr_common.a import x\n"
        "def f():\n"
        "    import dptr_common.b as b\n"
        "    from . import c\n"
        "    try:\n"
        "        from .d import y\n"
        "    except ImportError:\n"
        "        pass\n"
        "    return importlib.import_module('dptr_common.e'), __import__('dptr_common.f')\n"
    )
    found = _imports_in(source)
    assert {f"dptr_common.{m}" for m in "abcdef"} <= found, sorted(found)


def test_render_staging_does_not_import_render() -> None:
    path = Path(dptr_common.__file__).parent / "render_staging.py"
    found = _imports_in(path.read_text(), "dptr_common")
    assert any(name.startswith("dptr_common.") for name in found), sorted(found)  # the scan works here
    assert not {"dptr_common.render", "dptr_common.render.render_job"} & found, sorted(found)
    # The other way round is the one dependency between them.
    render = _imports_in((Path(dptr_common.__file__).parent / "render.py").read_text(), "dptr_common")
    assert "dptr_common.render_staging" in render, sorted(render)


#: The operator's stack, lowest first (operator/dptr_operator/services.py says what each
#: layer is for).  A module imports dptr_operator modules from lower layers only (leaves
#: from other leaves), anywhere in the module, TYPE_CHECKING blocks included.
OPERATOR_LAYERS: list[set[str]] = [
    {
        "config",
        "events",
        "finalizers",
        "health",
        "history",
        "index",
        "installcheck",
        "leader",
        "metrics",
        "outcomes",
        "activities",
        "pipelinelogs",
        "services",
        "statuswriter",
        "tenancy",
        "workpool",
    },
    {"polling"},
    {"runners"},
    {"reporter"},
    {"endings", "heartbeats", "pods"},
    {"dispatch"},
    {"runtime"},
    {"main"},
    {"cli"},
]


def _operator_modules_imported(path: Path) -> set[str]:
    names = _imports_in(path.read_text(), "dptr_operator")
    return {n.split(".")[1] for n in names if n.startswith("dptr_operator.") and n.count(".") == 1}


def test_operator_modules_import_only_the_layers_below_them() -> None:
    package = Path(__file__).resolve().parents[2] / "operator" / "dptr_operator"
    layer_of = {name: level for level, names in enumerate(OPERATOR_LAYERS) for name in names}
    modules = {p.stem for p in package.glob("*.py") if p.stem != "__init__"}
    assert modules == set(layer_of), (
        f"place each module in OPERATOR_LAYERS: {sorted(modules ^ set(layer_of))}"
    )
    wrong = []
    for module in sorted(modules):
        level = layer_of[module]
        for imported in _operator_modules_imported(package / f"{module}.py") & modules:
            allowed = layer_of[imported] == 0 if level == 0 else layer_of[imported] < level
            if not allowed:
                wrong.append(f"{module} (layer {level}) imports {imported} (layer {layer_of[imported]})")
    assert wrong == [], wrong
    # The scan sees this package's imports (a broken scan would pass everything).
    assert "services" in _operator_modules_imported(package / "runtime.py")
