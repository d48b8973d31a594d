"""Host packages: check for Debian packages and install the missing ones with the host's apt-get.

Build dependencies and run-time firmware are ordinary host packages (the machine's own apt, which the
project is allowed to use); only the packages from other suites go through :mod:`.apt`'s private state.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterable

from vhost_iommu.provision.errors import ProvisionError
from vhost_iommu.provision.paths import cache_root
from vhost_iommu.provision.progress import run_logged


def is_installed(package: str) -> bool:
    """Whether dpkg reports ``package`` as installed."""
    completed = subprocess.run(
        ["dpkg-query", "-W", "-f=${Status}", package], check=False, capture_output=True, text=True
    )
    return completed.returncode == 0 and completed.stdout.strip().endswith(" installed")


def missing_packages(packages: Iterable[str]) -> list[str]:
    return [package for package in packages if not is_installed(package)]


def ensure_packages(packages: Iterable[str], *, why: str) -> None:
    """Install whichever of ``packages`` are missing (one apt-get call; an index refresh if it fails)."""
    missing = missing_packages(packages)
    if not missing:
        return
    if shutil.which("apt-get") is None:
        raise ProvisionError(
            f"{why} needs the Debian packages {' '.join(missing)}, and apt-get is not available"
        )
    if os.geteuid() != 0:
        raise ProvisionError(
            f"{why} needs the Debian packages {' '.join(missing)}: run `apt-get install "
            f"{' '.join(missing)}` as root, then try again"
        )
    log = cache_root() / "host-packages.log"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "--no-install-recommends", *missing]
    try:
        run_logged(install, title=f"host: installing {' '.join(missing)}", log=log, env=env)
    except ProvisionError:
        # A fresh machine has no package lists yet; refresh them once and retry.
        run_logged(["apt-get", "update"], title="host: refreshing package lists", log=log, env=env)
        run_logged(install, title=f"host: installing {' '.join(missing)}", log=log, env=env)
