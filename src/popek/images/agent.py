"""The guest agent (``popek-agent``) of the minimal image.

A small C program (``guest/popek-agent.c``), linked statically against the
host's C library by the host's gcc, like the verifier (``verifier.py``).  It
replaced a shell script that polled its port five times a second while no
host client was connected (a fork and an exec each time): the program sleeps
in the kernel between clients, streams ``exec`` output in bounded chunks, and
ends a command whose client went away.  The protocol is described at the top
of the source and in ``engines/qemu/agent.py``.
"""

from __future__ import annotations

import shutil
import subprocess
from importlib import resources
from pathlib import Path

from popek.errors import ImageError

SOURCE = "popek-agent.c"
GUEST_PATH = "sbin/popek-agent"
#: the compiler is taken from the system directories, never from the caller's PATH
TOOL_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


def build(staging: Path) -> Path:
    """Compile ``popek-agent`` in ``staging``; return the static binary."""
    gcc = shutil.which("gcc", path=TOOL_PATH)
    if gcc is None:
        raise ImageError("gcc is needed to build the guest agent popek-agent: install the "
                         "Debian packages gcc and libc6-dev (make demo does it)")
    src = staging / SOURCE
    src.write_bytes((resources.files("popek.images") / "guest" / SOURCE).read_bytes())
    out = staging / "popek-agent"
    res = subprocess.run([gcc, "-static", "-Os", "-s", "-o", str(out), str(src)],
                         capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise ImageError(f"building popek-agent failed: {res.stderr.strip()[-500:]}")
    return out


def install(binary: Path, root: Path) -> None:
    """Put the agent at /sbin/popek-agent in the tree ``root``."""
    dest = root / GUEST_PATH
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(binary, dest)
    dest.chmod(0o755)
