"""The guest-side attestation verifier (``popek-verify``) of the minimal image.

A small C program (``guest/popek-verify.c``) linked statically against
libsodium, whose static library comes from Debian's ``libsodium-dev``
package, fetched with ``apt-get download`` like the kernel and busybox.  The
host's gcc builds it; no library is installed on the host.
"""

from __future__ import annotations

from pathlib import Path

from popek.errors import ImageError
from popek.images import cguest, debs

PACKAGE = "libsodium-dev"
SOURCE = "popek-verify.c"
GUEST_PATH = "usr/bin/popek-verify"


def build(cache: debs.DebCache, staging: Path) -> Path:
    """Compile ``popek-verify`` in ``staging``; return the static binary."""
    gcc = cguest.gcc("guest verifier popek-verify")
    deb = cache.fetch(PACKAGE)
    root = staging / "libsodium"
    debs.extract(deb, root)
    static = sorted(root.glob("usr/lib/*/libsodium.a"))
    if not static:
        raise ImageError(f"{deb.name} has no libsodium.a")
    return cguest.compile_static(gcc, staging, SOURCE, "popek-verify",
                                 [f"-I{root / 'usr' / 'include'}", str(static[0])])


def install(binary: Path, root: Path) -> None:
    """Put the verifier at /usr/bin/popek-verify in the tree ``root``."""
    cguest.install(binary, root, GUEST_PATH)
