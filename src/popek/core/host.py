"""What this host can offer: CPUs and memory, and checks of requests against them."""

from __future__ import annotations

import os
from pathlib import Path

from popek.core.model import MIN_MEMORY
from popek.errors import InvalidInput, ResourceError
from popek.units import format_size


def host_cpus() -> int:
    """Return the number of CPUs this process may run on."""
    return len(os.sched_getaffinity(0))


def host_memory(meminfo: Path = Path("/proc/meminfo")) -> int:
    """Return the host's total memory in bytes (``MemTotal``)."""
    for line in meminfo.read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    raise ResourceError("cannot read MemTotal from /proc/meminfo")


def check_resources(vcpus: int, memory: int) -> None:
    """Validate a request for ``vcpus`` and ``memory`` bytes against this host.

    Raises :class:`InvalidInput` for values that make no sense and
    :class:`ResourceError` for more than the host has.
    """
    if vcpus < 1:
        raise InvalidInput(f"invalid vCPU count {vcpus}: must be at least 1")
    cpus = host_cpus()
    if vcpus > cpus:
        raise ResourceError(f"{vcpus} vCPUs asked for, but this host has only {cpus} CPUs")
    if memory < MIN_MEMORY:
        raise InvalidInput(f"invalid memory {format_size(memory)}: must be at least "
                           f"{format_size(MIN_MEMORY)}")
    if memory % (1 << 20):
        raise InvalidInput(f"invalid memory {memory} bytes: must be a whole number of MiB")
    total = host_memory()
    if memory > total:
        raise ResourceError(f"{format_size(memory)} of memory asked for, but this host has "
                            f"only {format_size(total)} ({total >> 20}MiB)")
