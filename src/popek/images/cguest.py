"""Small C programs of the minimal image, built by the host's gcc, linked statically.

The guest agent (``agent.py``) and the attestation verifier (``verifier.py``)
are each one source file under ``guest/``; this builds and installs either.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from popek import proc
from popek.errors import ImageError


def gcc(what: str) -> str:
    """The host's gcc, from popek's fixed tool path; :class:`ImageError` naming ``what``
    needs it when it is missing."""
    found = proc.tool("gcc")
    if found is None:
        raise ImageError(f"gcc is needed to build the {what}: install the "
                         "Debian packages gcc and libc6-dev (make demo does it)")
    return found


def compile_static(compiler: str, staging: Path, source: str, program: str,
                   extra: Sequence[str] = ()) -> Path:
    """Compile ``guest/<source>`` with ``compiler`` (:func:`gcc`) into the static binary
    ``staging/<program>``; return it.  ``extra`` are further gcc arguments (include
    paths, libraries), after the source.
    """
    src = staging / source
    src.write_bytes((resources.files("popek.images") / "guest" / source).read_bytes())
    out = staging / program
    res = subprocess.run([compiler, "-static", "-Os", "-s", "-o", str(out), str(src), *extra],
                         capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise ImageError(f"building {program} failed: {res.stderr.strip()[-500:]}")
    return out


def install(binary: Path, root: Path, guest_path: str) -> None:
    """Put ``binary`` at ``guest_path`` (relative) in the tree ``root``, mode 0755."""
    dest = root / guest_path
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(binary, dest)
    dest.chmod(0o755)
