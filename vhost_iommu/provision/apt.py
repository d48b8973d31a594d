"""A private apt state: download Debian packages from other suites without touching the host's apt.

The host's own configuration (sources, lists, cache) is never read for package state nor written:
every apt call gets its own source list, list directory and cache directory. Only the mirror URI and
its keyring are taken from the host's ``debian.sources``, read at run time, so that the repository
names no mirror of its own.
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from vhost_iommu.provision.errors import ProvisionError
from vhost_iommu.provision.progress import run_logged

HOST_SOURCES = Path("/etc/apt/sources.list.d/debian.sources")
HOST_SOURCES_LIST = Path("/etc/apt/sources.list")


@dataclass(frozen=True)
class Mirror:
    """A Debian mirror: its URI and the keyring its Release files are signed with (None: apt's default)."""

    uri: str
    signed_by: str | None


def _deb822_stanzas(text: str) -> list[dict[str, str]]:
    stanzas: list[dict[str, str]] = []
    current: dict[str, str] = {}
    last_key: str | None = None
    for raw in text.splitlines():
        if raw.startswith("#"):
            continue
        if not raw.strip():
            if current:
                stanzas.append(current)
            current, last_key = {}, None
            continue
        if raw[0] in " \t" and last_key is not None:
            current[last_key] += "\n" + raw.strip()
            continue
        key, sep, value = raw.partition(":")
        if not sep:
            continue
        last_key = key.strip().lower()
        current[last_key] = value.strip()
    if current:
        stanzas.append(current)
    return stanzas


def parse_debian_mirror(deb822_text: str) -> Mirror:
    """The main Debian archive named in a deb822 sources file (not the security archive)."""
    candidates: list[Mirror] = []
    for stanza in _deb822_stanzas(deb822_text):
        if stanza.get("enabled", "yes").lower() == "no":
            continue
        if "deb" not in stanza.get("types", "").split() and "deb-src" not in stanza.get("types", "").split():
            continue
        suites = stanza.get("suites", "").split()
        for uri in stanza.get("uris", "").split():
            is_security = uri.rstrip("/").endswith("-security") or any(
                s.endswith("-security") for s in suites
            )
            if not is_security:
                candidates.append(Mirror(uri.rstrip("/"), stanza.get("signed-by") or None))
    if not candidates:
        raise ProvisionError("no Debian archive URI found in the apt sources file")
    return candidates[0]


_ONE_LINE_SOURCE = re.compile(
    r"^\s*deb(?:-src)?\s+(?:\[(?P<options>[^\]]*)\]\s+)?(?P<uri>\S+)\s+(?P<suite>\S+)"
)


def parse_one_line_mirror(sources_list_text: str) -> Mirror | None:
    """The first non-security archive in a classic one-line ``sources.list`` (None when there is none)."""
    for line in sources_list_text.splitlines():
        match = _ONE_LINE_SOURCE.match(line)
        if not match or match["uri"].rstrip("/").endswith("-security") or "security" in match["suite"]:
            continue
        signed_by = None
        for option in (match["options"] or "").split():
            key, _, value = option.partition("=")
            if key == "signed-by":
                signed_by = value
        return Mirror(match["uri"].rstrip("/"), signed_by)
    return None


def host_mirror() -> Mirror:
    """The Debian mirror this machine is configured with, read now (never hard-coded)."""
    if HOST_SOURCES.is_file():
        return parse_debian_mirror(HOST_SOURCES.read_text())
    if HOST_SOURCES_LIST.is_file():
        mirror = parse_one_line_mirror(HOST_SOURCES_LIST.read_text())
        if mirror is not None:
            return mirror
    raise ProvisionError(
        f"cannot find the Debian mirror: neither {HOST_SOURCES} nor {HOST_SOURCES_LIST} names one"
    )


@dataclass(frozen=True)
class SourceLine:
    """One line of the private source list."""

    kind: str  # "deb" or "deb-src"
    suite: str
    components: tuple[str, ...] = ("main",)

    def render(self, mirror: Mirror, architecture: str | None = None) -> str:
        settings = [f"arch={architecture}"] if architecture else []
        settings += [f"signed-by={mirror.signed_by}"] if mirror.signed_by else []
        options = f"[{' '.join(settings)}] " if settings else ""
        return f"{self.kind} {options}{mirror.uri} {self.suite} {' '.join(self.components)}"


def compare_debian_versions(left: str, right: str) -> int:
    """-1, 0 or 1 as Debian orders the two versions (dpkg's own rules: epochs, ~, revisions)."""
    for relation, result in (("lt", -1), ("eq", 0)):
        completed = subprocess.run(
            ["dpkg", "--compare-versions", left, relation, right], check=False, capture_output=True
        )
        if completed.returncode == 0:
            return result
    return 1


def newest_first(versions: Sequence[str]) -> list[str]:
    """Distinct versions, newest first by Debian's ordering."""
    unique = sorted(set(versions), key=functools.cmp_to_key(compare_debian_versions), reverse=True)
    return unique


def parse_showsrc_versions(showsrc_output: str, package: str) -> list[str]:
    """Versions of source package ``package`` in ``apt-cache showsrc`` output (other packages ignored)."""
    versions: list[str] = []
    for stanza in _deb822_stanzas(showsrc_output):
        if stanza.get("package") == package and "version" in stanza:
            versions.append(stanza["version"])
    return versions


class PrivateApt:
    """apt-get/apt-cache with their own sources, lists and cache under ``state_dir``.

    ``architecture`` (a Debian architecture such as ``arm64``) makes the binary indexes, queries and
    downloads that architecture's alone; None leaves apt's own choice, the host's.
    """

    def __init__(
        self,
        state_dir: Path,
        sources: Sequence[SourceLine],
        mirror: Mirror | None = None,
        *,
        architecture: str | None = None,
    ) -> None:
        self.state_dir = state_dir
        self.mirror = mirror if mirror is not None else host_mirror()
        self.sources = tuple(sources)
        self.architecture = architecture
        self.log = state_dir / "apt.log"

    @property
    def sources_file(self) -> Path:
        return self.state_dir / "sources.list"

    def options(self) -> list[str]:
        """The ``-o`` options that divert every piece of apt state into ``state_dir``."""
        lists = self.state_dir / "lists"
        cache = self.state_dir / "cache"
        return [
            "-o", f"Dir::Etc::sourcelist={self.sources_file}",
            "-o", "Dir::Etc::sourceparts=-",
            "-o", f"Dir::State::Lists={lists}",
            "-o", f"Dir::Cache={cache}",
            # The host may pin or prefer suites; none of that applies to this private state.
            "-o", "Dir::Etc::preferencesparts=-",
            "-o", f"Dir::Etc::preferences={self.state_dir / 'preferences'}",
            "-o", "APT::Get::List-Cleanup=0",
            "-o", "Acquire::Languages=none",
            *self._architecture_options(),
        ]  # fmt: skip

    def _architecture_options(self) -> list[str]:
        if self.architecture is None:
            return []
        # The native architecture decides which package an unqualified name means; the list, which
        # architectures' indexes are fetched at all.
        return [
            "-o",
            f"APT::Architecture={self.architecture}",
            "-o",
            f"APT::Architectures={self.architecture}",
        ]

    def _prepare(self) -> None:
        for sub in ("lists/partial", "cache/archives/partial"):
            (self.state_dir / sub).mkdir(parents=True, exist_ok=True)
        wanted = "\n".join(line.render(self.mirror, self.architecture) for line in self.sources) + "\n"
        if not self.sources_file.is_file() or self.sources_file.read_text() != wanted:
            self.sources_file.write_text(wanted)
            # A changed source list invalidates the lists fetched for the old one.
            (self.state_dir / "updated").unlink(missing_ok=True)

    def update(self, *, force: bool = False) -> bool:
        """Fetch the indexes once (again only when ``force`` or the source list changed); True if fetched."""
        self._prepare()
        stamp = self.state_dir / "updated"
        if stamp.is_file() and not force:
            return False
        run_logged(
            ["apt-get", *self.options(), "update"], title="apt: fetching package indexes", log=self.log
        )
        stamp.touch()
        return True

    def query(self, *args: str) -> str:
        """Run ``apt-cache`` against the private state and return its stdout."""
        self._prepare()
        completed = subprocess.run(
            ["apt-cache", *self.options(), *args], check=False, capture_output=True, text=True
        )
        if completed.returncode != 0:
            raise ProvisionError(f"apt-cache {' '.join(args)} failed: {completed.stderr.strip()}")
        return completed.stdout

    def source_versions(self, package: str) -> list[str]:
        """Every version of source package ``package`` the indexes list, newest first."""
        return newest_first(parse_showsrc_versions(self.query("showsrc", package), package))

    def binary_versions(self, package: str) -> list[str]:
        """Every version of binary package ``package`` the indexes list, newest first."""
        versions = [
            line.split("|")[1].strip()
            for line in self.query("madison", package).splitlines()
            if line.count("|") >= 2 and line.split("|")[0].strip() == package
        ]
        return newest_first(versions)

    def _get(self, args: Sequence[str], *, title: str, cwd: Path) -> None:
        cwd.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        run_logged(["apt-get", *self.options(), *args], title=title, log=self.log, cwd=cwd, env=env)

    def download_source(self, package: str, version: str, into: Path) -> None:
        """Fetch the .dsc and tarballs of ``package=version`` into ``into`` (not unpacked)."""
        self._get(
            ["source", "--download-only", f"{package}={version}"],
            title=f"apt: downloading source {package} {version}",
            cwd=into,
        )

    def download_binary(self, package: str, version: str, into: Path) -> Path:
        """Fetch the .deb of ``package=version`` into ``into`` and return its path."""
        before = set(into.glob("*.deb")) if into.is_dir() else set()
        self._get(
            ["download", f"{package}={version}"], title=f"apt: downloading {package} {version}", cwd=into
        )
        fetched = sorted(set(into.glob("*.deb")) - before) or sorted(into.glob(f"{package}_*.deb"))
        if not fetched:
            raise ProvisionError(f"apt-get download {package}={version} produced no .deb in {into}")
        return fetched[-1]

    def first_fetchable(self, versions: Sequence[str], fetch: Callable[[str], None]) -> str:
        """Call ``fetch(version)`` for each version in turn until one succeeds: the index can list versions
        the pool no longer has, so a 404 on the first is not the end."""
        failures: list[str] = []
        for version in versions:
            try:
                fetch(version)
            except ProvisionError as error:
                failures.append(f"{version}: {str(error).splitlines()[0]}")
                continue
            return version
        raise ProvisionError(
            "no listed version could be downloaded:\n  " + "\n  ".join(failures or ["none listed"])
        )

    def fetch_listed(self, list_versions: Callable[[], list[str]], fetch: Callable[[str], None]) -> str:
        """:meth:`first_fetchable` over ``list_versions()``; when every version fails with indexes fetched
        by an earlier run, the indexes may be stale: fetch them again and retry once."""
        fetched_now = self.update()
        try:
            return self.first_fetchable(list_versions(), fetch)
        except ProvisionError:
            if fetched_now:
                raise
        self.update(force=True)
        return self.first_fetchable(list_versions(), fetch)
