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

from pathlib import Path

from popek.images import cguest

SOURCE = "popek-agent.c"
GUEST_PATH = "sbin/popek-agent"


def build(staging: Path) -> Path:
    """Compile ``popek-agent`` in ``staging``; return the static binary."""
    return cguest.compile_static(cguest.gcc("guest agent popek-agent"), staging, SOURCE,
                                 "popek-agent")


def install(binary: Path, root: Path) -> None:
    """Put the agent at /sbin/popek-agent in the tree ``root``."""
    cguest.install(binary, root, GUEST_PATH)
