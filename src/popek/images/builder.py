"""What an image builder receives and returns.

A builder writes the files of an image into an empty directory and says
which one is the kernel, which one the initrd, and how to boot them, and/or
which one is the root filesystem tar of containers.  The store then hashes
the files, writes the manifest and publishes the image.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from popek.images.process import Process

Progress = Callable[[str], None]


@dataclass(frozen=True)
class BuildContext:
    """Where a builder writes (``out``), its download cache and its progress sink."""

    out: Path
    cache: Path
    progress: Progress


@dataclass(frozen=True)
class BuildResult:
    """The boot facts of a built image; file names are relative to ``out`` ("" = none)."""

    version: str
    kernel: str
    initrd: str
    cmdline: str
    kernel_version: str
    arch: str
    rootfs: str = ""
    process: Process | None = None


Builder = Callable[[BuildContext], BuildResult]


def quiet(_message: str) -> None:
    """Discard a progress message."""
