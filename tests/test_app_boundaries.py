"""Apps call each other only through public service/selector functions, and vms (the core)
never imports networking or snapshots: they join the VM lifecycle through hooks and
operation handlers they register from their AppConfig.ready."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
APPS = ("accounts", "vms", "networking", "snapshots")


def _imports(path: Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            yield node.module, [alias.name for alias in node.names]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, []


def _sources(app: str):
    return [p for p in (ROOT / app).rglob("*.py") if "migrations" not in p.parts]


@pytest.mark.parametrize("other", ["networking"])
def test_it_keeps_vms_free_of_imports_of_the_apps_built_on_it(other):
    offenders = [
        f"{path.relative_to(ROOT)}: {module}"
        for path in _sources("vms")
        for module, _names in _imports(path)
        if module == other or module.startswith(f"{other}.")
    ]
    assert offenders == []


@pytest.mark.parametrize("app", APPS)
def test_it_imports_no_private_names_from_other_apps(app):
    offenders = [
        f"{path.relative_to(ROOT)}: {module}.{name}"
        for path in _sources(app)
        for module, names in _imports(path)
        if module.split(".")[0] in APPS and module.split(".")[0] != app
        for name in names
        if name.startswith("_")
    ]
    assert offenders == []


@pytest.mark.parametrize("app", APPS)
def test_it_reaches_no_private_attributes_of_other_apps_modules(app):
    offenders = []
    for path in _sources(app):
        tree = ast.parse(path.read_text(), filename=str(path))
        aliases = {}  # local name -> module of another app, e.g. vm_services -> vms.services
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in APPS:
                if node.module.split(".")[0] == app:
                    continue
                for alias in node.names:
                    aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
                and node.attr.startswith("_")
            ):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}: {aliases[node.value.id]}.{node.attr}")
    assert offenders == []
