"""Where provisioned artefacts live: a per-user cache outside the repository."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

CACHE_ENV = "VHOST_IOMMU_CACHE"


def cache_root() -> Path:
    """``$VHOST_IOMMU_CACHE`` when set, else ``~/.cache/vhost-iommu`` (not created here)."""
    override = os.environ.get(CACHE_ENV)
    if override:
        return Path(override).expanduser().resolve()
    return Path.home() / ".cache" / "vhost-iommu"


def repo_root() -> Path:
    """The source checkout this package was imported from (it is installed editable)."""
    return Path(__file__).resolve().parents[2]


def source_commit() -> str:
    """``git describe --always --dirty`` of the checkout, for reports of what was measured; "unknown"
    outside a git checkout."""
    try:
        described = subprocess.run(
            ["git", "-C", str(repo_root()), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return described.stdout.strip()
