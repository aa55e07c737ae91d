"""Where the URL and token come from: an argument, else ``MSBX_URL``/``MSBX_TOKEN``, else a
profile of the config file that ``msbx login`` writes (``$MSBX_CONFIG``, default
``~/.config/msbx/config.json``, mode 0600)::

    {"default": "prod", "profiles": {"prod": {"url": "https://...", "token": "msbx_..."}}}

The profile is the ``profile`` argument, else ``MSBX_PROFILE``, else the file's ``default``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from msbx.errors import SandboxError


class ConfigError(SandboxError):
    """No URL or token, or an unreadable config file."""

    exit_code = 2


@dataclass(frozen=True)
class Credentials:
    url: str
    token: str
    profile: str | None = None


def config_path() -> Path:
    explicit = os.environ.get("MSBX_CONFIG")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "msbx" / "config.json"


def config_load(path: Path | None = None) -> dict[str, Any]:
    path = path or config_path()
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {"profiles": {}}
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("profiles", {}), dict):
        raise ConfigError(f"{path} is not an msbx config file")
    data.setdefault("profiles", {})
    return data


def config_save_profile(
    name: str, *, url: str, token: str, make_default: bool = True, path: Path | None = None
) -> Path:
    """Store a profile; the file (and its folder) are created readable by the owner only."""
    path = path or config_path()
    data = config_load(path)
    data["profiles"][name] = {"url": url.rstrip("/"), "token": token}
    if make_default or not data.get("default"):
        data["default"] = name
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(str(tmp), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(data, handle, indent=2, sort_keys=True)
        handle.write("\n")
    os.chmod(tmp, 0o600)  # an existing file keeps its mode with O_CREAT
    os.replace(tmp, path)
    return path


def credentials_resolve(url: str | None = None, token: str | None = None, profile: str | None = None) -> Credentials:
    """URL and token from the arguments, the environment, then the config file."""
    url = url or os.environ.get("MSBX_URL") or None
    token = token or os.environ.get("MSBX_TOKEN") or None
    chosen = profile or os.environ.get("MSBX_PROFILE") or None
    if url and token and not chosen:
        return Credentials(url.rstrip("/"), token)
    data = config_load()
    name = chosen or data.get("default")
    entry = data["profiles"].get(name) if name else None
    if chosen and entry is None:
        raise ConfigError(f"no profile {chosen!r} in {config_path()} (msbx login --profile {chosen})")
    entry = entry or {}
    url = url or entry.get("url")
    token = token or entry.get("token")
    if not url:
        raise ConfigError("no server URL: pass url=, set MSBX_URL or run `msbx login`")
    if not token:
        raise ConfigError("no API token: pass token=, set MSBX_TOKEN or run `msbx login`")
    return Credentials(str(url).rstrip("/"), str(token), name)
