"""The guest-side attestation verifier (``popek-verify``) of the minimal image.

A small C program (``guest/popek-verify.c``) linked statically against
libsodium, whose static library comes from Debian's ``libsodium-dev``
package, fetched with ``apt-get download`` like the kernel and busybox.  The
host's gcc builds it; no library is installed on the host.
"""

from __future__ import annotations

import shutil
import subprocess
from importlib import resources
from pathlib import Path

from popek import proc
from popek.errors import ImageError
from popek.images import debs

PACKAGE = "libsodium-dev"
SOURCE = "popek-verify.c"
GUEST_PATH = "usr/bin/popek-verify"


def build(cache: debs.DebCache, staging: Path) -> Path:
    """Compile ``popek-verify`` in ``staging``; return the static binary."""
    gcc = proc.tool("gcc")
    if gcc is None:
        raise ImageError("gcc is needed to build the guest verifier popek-verify: install the "
                         "Debian packages gcc and libc6-dev (make demo does it)")
    deb = cache.fetch(PACKAGE)
    root = staging / "libsodium"
    debs.extract(deb, root)
    static = sorted(root.glob("usr/lib/*/libsodium.a"))
    if not static:
        raise ImageError(f"{deb.name} has no libsodium.a")
    src = staging / SOURCE
    src.write_bytes((resources.files("popek.images") / "guest" / SOURCE).read_bytes())
    out = staging / "popek-verify"
    res = subprocess.run([gcc, "-static", "-Os", "-s", "-o", str(out), str(src),
                          f"-I{root / 'usr' / 'include'}", str(static[0])],
                         capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise ImageError(f"building popek-verify failed: {res.stderr.strip()[-500:]}")
    return out


def install(binary: Path, root: Path) -> None:
    """Put the verifier at /usr/bin/popek-verify in the tree ``root``."""
    dest = root / GUEST_PATH
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(binary, dest)
    dest.chmod(0o755)
