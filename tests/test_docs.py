"""docs/configuration.md lists every setting sandbox_site/settings.py reads, and nothing that is gone;
README's Layout section names every folder."""

from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = ROOT / "sandbox_site" / "settings.py"
CONFIGURATION = ROOT / "docs" / "configuration.md"
APPS = ("sandbox_site", "accounts", "vms", "networking", "snapshots", "guest_agents")


def _environment_variables(tree: ast.Module) -> set[str]:
    """What settings.py reads from the environment: the names passed to ``env(...)``,
    ``env.<type>(...)``, ``os.getenv(...)``, ``os.environ.get(...)`` and ``os.environ[...]``."""

    def reads(func: ast.expr) -> bool:
        if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id == "env":
            return func.attr != "read_env"
        return ast.unparse(func) in ("env", "os.getenv", "os.environ.get")

    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and node.args and reads(node.func):
            key = node.args[0]
        elif isinstance(node, ast.Subscript) and ast.unparse(node.value) == "os.environ":
            key = node.slice
        else:
            continue
        if isinstance(key, ast.Constant) and isinstance(key.value, str):
            names.add(key.value)
    return names


def _sandbox_settings(tree: ast.Module) -> set[str]:
    """The ``SANDBOX_*`` names settings.py assigns (also inside ``if`` blocks)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign | ast.AnnAssign | ast.AugAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name) and t.id.startswith("SANDBOX_"))
    return names


def _documented() -> set[str]:
    return set(re.findall(r"`([A-Z][A-Z0-9_]+)`", CONFIGURATION.read_text()))


def _documented_variables() -> set[str]:
    """Names in the first column of the tables."""
    return set(re.findall(r"^\| `([A-Z][A-Z0-9_]+)` \|", CONFIGURATION.read_text(), re.MULTILINE))


def test_it_finds_the_settings_it_checks():
    tree = ast.parse(SETTINGS.read_text())
    assert {"SECRET_KEY", "DATABASE_URL", "SANDBOX_BOOT_TIMEOUT"} <= _environment_variables(tree)
    assert {"SANDBOX_DEFAULT_QUOTA", "SANDBOX_HOSTD_SOCKET"} <= _sandbox_settings(tree)
    assert {"DEBUG", "SANDBOX_NETNS"} <= _documented_variables()


def test_it_documents_every_environment_variable_settings_reads():
    missing = _environment_variables(ast.parse(SETTINGS.read_text())) - _documented_variables()
    assert not missing, f"add these to docs/configuration.md (default, unit, meaning): {sorted(missing)}"


def test_it_documents_every_sandbox_setting():
    missing = _sandbox_settings(ast.parse(SETTINGS.read_text())) - _documented()
    assert not missing, f"settings.py defines these, docs/configuration.md does not name them: {sorted(missing)}"


def test_every_documented_variable_is_still_read_somewhere():
    source = "\n".join(path.read_text() for app in APPS for path in (ROOT / app).rglob("*.py"))
    source += (ROOT / "scripts" / "run.sh").read_text()
    stale = {name for name in _documented_variables() if f'"{name}"' not in source}
    assert not stale, f"docs/configuration.md documents variables nothing reads: {sorted(stale)}"


def _readme_layout() -> str:
    readme = (ROOT / "README.md").read_text()
    return readme[readme.index("## Layout") :]


def test_the_readme_layout_names_every_top_level_folder_and_subpackage():
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, timeout=30, check=False
    ).stdout.splitlines()
    if not tracked:
        pytest.skip("not a git checkout")
    folders = {path.split("/", 1)[0] for path in tracked if "/" in path}
    packages = {
        str(init.parent.relative_to(ROOT))
        for app in APPS
        for init in (ROOT / app).glob("*/__init__.py")
        if init.parent.name not in ("migrations", "management")
    }
    layout = _readme_layout()
    missing = sorted(name for name in folders | packages if f"`{name}/" not in layout)
    assert not missing, f"README's Layout section does not name: {missing}"
