"""Choosing the accelerator: KVM where a real hardware KVM answers, TCG otherwise.

``/dev/kvm`` alone is not proof: some hosts expose a software-backed KVM
(the ``kvm_pvm`` module) under which an unmodified guest kernel fails.  popek
picks KVM only when ``/dev/kvm`` opens, answers the KVM API version ioctl,
and the loaded backend is a hardware one (``kvm_intel`` or ``kvm_amd``).
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from popek.errors import InvalidInput

ACCELS = ("auto", "kvm", "tcg")
HARDWARE_BACKENDS = ("kvm_intel", "kvm_amd")
SOFTWARE_BACKENDS = ("kvm_pvm",)
_KVM_GET_API_VERSION = 0xAE00
_KVM_API_VERSION = 12


def kvm_backend(sys_module: Path = Path("/sys/module")) -> str | None:
    """Return the loaded KVM backend module name, or ``None`` when there is none."""
    for name in SOFTWARE_BACKENDS + HARDWARE_BACKENDS:
        if (sys_module / name).exists():
            return name
    return None


def kvm_answers(dev: Path = Path("/dev/kvm")) -> bool:
    """Return whether ``dev`` opens and reports the stable KVM API version."""
    try:
        fd = os.open(dev, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        return fcntl.ioctl(fd, _KVM_GET_API_VERSION) == _KVM_API_VERSION
    except OSError:
        return False
    finally:
        os.close(fd)


def detect(dev: Path = Path("/dev/kvm"), sys_module: Path = Path("/sys/module")) -> str:
    """Return ``kvm`` when a hardware-backed KVM answers, else ``tcg``."""
    backend = kvm_backend(sys_module)
    if backend in HARDWARE_BACKENDS and kvm_answers(dev):
        return "kvm"
    return "tcg"


def choose(requested: str) -> str:
    """Resolve ``auto`` by detection; validate an explicit choice."""
    if requested not in ACCELS:
        raise InvalidInput(f"invalid accelerator {requested!r}; allowed: {', '.join(ACCELS)}")
    if requested == "auto":
        return detect()
    if requested == "kvm" and not kvm_answers():
        raise InvalidInput("accelerator 'kvm' was asked for but /dev/kvm does not answer; "
                           "use --accel tcg or --accel auto")
    return requested
