"""Fetch Debian packages with ``apt-get download`` into a reusable cache.

``apt-get download --print-uris`` names the file and its hash without
downloading; a cached file that matches is used as is, so a second build
downloads nothing.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from popek.errors import ImageError
from popek.images.builder import Progress

APT_LISTS = Path("/var/lib/apt/lists")
APT_OPTS = ("-o", "APT::Sandbox::User=root")
_HASHES = {"SHA512": "sha512", "SHA256": "sha256", "SHA1": "sha1", "MD5Sum": "md5"}


@dataclass(frozen=True)
class DebLocation:
    """Where apt would fetch a package from, the file name and its expected hash."""

    uri: str
    filename: str
    size: int
    hash_alg: str
    hash_hex: str


def _env() -> dict[str, str]:
    return {**os.environ, "LC_ALL": "C", "DEBIAN_FRONTEND": "noninteractive"}


def _apt_lists_empty() -> bool:
    try:
        return not any("Packages" in p.name for p in APT_LISTS.iterdir())
    except OSError:
        return True


def parse_print_uris(text: str) -> list[DebLocation]:
    """Parse ``apt-get download --print-uris`` lines: ``'URI' FILE SIZE ALG:HEX``."""
    found: list[DebLocation] = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) != 4 or not parts[0].startswith("'") or ":" not in parts[3]:
            continue
        alg, _, hexval = parts[3].partition(":")
        if alg not in _HASHES or not parts[2].isdigit():
            continue
        found.append(DebLocation(parts[0].strip("'"), parts[1], int(parts[2]), alg, hexval))
    return found


def deb_field(deb: Path, name: str) -> str:
    """Return control field ``name`` of a .deb (``dpkg-deb -f``), or "" if absent."""
    res = subprocess.run(
        ["dpkg-deb", "-f", str(deb), name], capture_output=True, text=True, env=_env()
    )
    if res.returncode != 0:
        raise ImageError(f"cannot read {deb.name}: {res.stderr.strip()}")
    return res.stdout.strip()


def extract(deb: Path, dest: Path) -> None:
    """Unpack the files of a .deb into ``dest`` (``dpkg-deb -x``)."""
    dest.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(["dpkg-deb", "-x", str(deb), str(dest)], capture_output=True, text=True)
    if res.returncode != 0:
        raise ImageError(f"cannot extract {deb.name}: {res.stderr.strip()}")


class DebCache:
    """A directory of downloaded .deb files, filled by ``apt-get download``."""

    def __init__(self, directory: Path, progress: Progress) -> None:
        self.directory = directory
        self.progress = progress
        self.downloads = 0

    def locate(self, package: str) -> DebLocation:
        """Ask apt where ``package`` comes from, without downloading it."""
        # apt prints nothing for a file already present in its working
        # directory, so ask from an empty one and check the cache ourselves.
        with tempfile.TemporaryDirectory(prefix="apt-locate-") as empty:
            res = subprocess.run(
                ["apt-get", *APT_OPTS, "download", "--print-uris", package],
                capture_output=True,
                text=True,
                env=_env(),
                cwd=empty,
            )
        found = parse_print_uris(res.stdout) if res.returncode == 0 else []
        if not found:
            err = res.stderr.strip() or "no download location"
            if _apt_lists_empty():
                raise ImageError(
                    f"cannot fetch Debian package '{package}': the apt package lists are "
                    "empty; run apt-get update"
                )
            raise ImageError(
                f"cannot fetch Debian package '{package}': {err} (run apt-get update if the "
                "package lists are stale)"
            )
        return found[0]

    def _matches(self, path: Path, loc: DebLocation) -> bool:
        try:
            if path.stat().st_size != loc.size:
                return False
        except FileNotFoundError:
            return False
        digest = hashlib.new(_HASHES[loc.hash_alg])
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        return digest.hexdigest() == loc.hash_hex

    def fetch(self, package: str) -> Path:
        """Return the cached .deb of ``package``, downloading it only if needed."""
        self.directory.mkdir(parents=True, exist_ok=True)
        loc = self.locate(package)
        path = self.directory / loc.filename
        if self._matches(path, loc):
            self.progress(f"using cached {loc.filename}")
            return path
        path.unlink(missing_ok=True)
        self.progress(f"downloading {loc.filename} ({loc.size // 1024} KiB)")
        res = subprocess.run(
            ["apt-get", *APT_OPTS, "download", package],
            capture_output=True,
            text=True,
            env=_env(),
            cwd=self.directory,
        )
        self.downloads += 1
        if res.returncode != 0:
            raise ImageError(f"apt-get download {package} failed: {res.stderr.strip()}")
        if not self._matches(path, loc):
            path.unlink(missing_ok=True)
            raise ImageError(
                f"downloaded {loc.filename} does not match the size or hash apt announced"
            )
        return path
