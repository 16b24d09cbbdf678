"""Allocations shared by every ``POPEK_HOME`` on this host: uid ranges and CPU placement.

Each home has its own state store, but the kernel has one uid space: two
homes that both hand out uid 900000000 give their QEMUs the same uid, and one
home's QEMU may then ``ptrace`` or ``process_vm_readv`` the other's, and reach
its swtpm.  So a home reserves every uid range here too, host-wide, before
an instance may use it (:meth:`HostIds.reserve`), and gives it back when the
instance is deleted (:meth:`HostIds.release`).

The registry is one JSON file, ``/var/lib/popek-host/uids.json`` (0600 in a
0700 directory, root only; it lasts across reboots as the files owned by those
uids do), changed under an exclusive ``flock`` of ``host.lock`` and replaced
whole (written beside it, synced, renamed), so a crash leaves the old or the
new file, never half of one.  Each range names its home and instance.

It heals itself, under the lock, on every reservation: the ranges of a
home whose state store is gone are freed; this home's ranges are made to match
its store (a range its store no longer holds is freed: a delete that died
before its release; one the store holds but the registry lacks is added: a
home made before the registry, or a launch that died between its store
write and its reservation).

CPU placement (:class:`HostCpus`) is host-wide too: each home publishes the
CPUs its active instances are pinned to (``cpus.json``, the same way), and a
launch in any home picks the CPUs that carry the fewest instances of *all*
homes; before, two homes each pinned their first instance to CPU 0.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from popek.errors import StoreDamaged

#: the host-wide registry's directory (tests point it elsewhere)
HOST_DIR = Path("/var/lib/popek-host")
REGISTRY = "uids.json"
LOCK = "host.lock"


@dataclass(frozen=True)
class Range:
    """``size`` host ids from ``first`` on, held by the instance ``owner`` of ``home``."""

    first: int
    size: int
    home: str
    owner: str

    def overlaps(self, first: int, size: int) -> bool:
        """Whether this range shares an id with ``first .. first + size - 1``."""
        return self.first < first + size and first < self.first + self.size


class HostIds:
    """The host uid ranges of one home, kept apart from every other home's."""

    def __init__(self, home: Path, directory: Path | None = None) -> None:
        """``home``: this ``POPEK_HOME``; ``directory``: the registry's (:data:`HOST_DIR`)."""
        self.home = str(home.resolve())
        self.dir = directory or HOST_DIR

    # -- reading -------------------------------------------------------------------
    def ranges(self) -> list[Range]:
        """Every range held on this host, by every home."""
        with self._locked(fcntl.LOCK_SH):
            return self._load()

    def elsewhere(self) -> list[Range]:
        """The ranges other homes hold (what this home must not hand out)."""
        return [r for r in self.ranges() if r.home != self.home]

    # -- changing ------------------------------------------------------------------
    def reserve(self, first: int, size: int, owner: str,
                mine: Callable[[], dict[int, tuple[int, str]]]) -> bool:
        """Reserve ``size`` ids from ``first`` for ``owner`` of this home; ``False`` when taken.

        ``mine()`` returns the ranges this home's store holds (``{first: (size,
        owner)}``), read under the registry's lock so that a launch or delete
        of this home running meanwhile is seen whole (see the module's text).
        """
        with self._locked(fcntl.LOCK_EX):
            ranges = self._healed(self._load(), mine())
            if any(r.overlaps(first, size) and (r.home, r.first) != (self.home, first)
                   for r in ranges):
                self._save(ranges)
                return False
            ranges = [r for r in ranges if (r.home, r.first) != (self.home, first)]
            self._save([*ranges, Range(first, size, self.home, owner)])
            return True

    def release(self, first: int) -> None:
        """Free this home's range that starts at ``first`` (nothing when it holds none)."""
        with self._locked(fcntl.LOCK_EX):
            ranges = self._load()
            kept = [r for r in ranges if (r.home, r.first) != (self.home, first)]
            if len(kept) != len(ranges):
                self._save(kept)

    # -- the file --------------------------------------------------------------------
    def _healed(self, ranges: list[Range], mine: dict[int, tuple[int, str]]) -> list[Range]:
        """Drop ranges of homes that are gone and match this home's to its store."""
        out = [r for r in ranges if r.home == self.home and r.first in mine
               or r.home != self.home and (Path(r.home) / "state.db").exists()]
        held = {r.first for r in out if r.home == self.home}
        for first, (size, owner) in sorted(mine.items()):
            if first not in held and not any(r.overlaps(first, size) for r in out):
                out.append(Range(first, size, self.home, owner))
        return out

    @contextlib.contextmanager
    def _locked(self, how: int) -> Iterator[None]:
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.dir / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, how)
            yield
        finally:
            os.close(fd)

    def _load(self) -> list[Range]:
        path = self.dir / REGISTRY
        try:
            doc = json.loads(path.read_bytes())
            return [Range(int(r["first"]), int(r["size"]), str(r["home"]), str(r["owner"]))
                    for r in doc["ranges"]]
        except FileNotFoundError:
            return []
        except (ValueError, KeyError, TypeError) as exc:
            raise StoreDamaged(f"the host-wide uid registry {path} is damaged ({exc!r:.80}); "
                               "popek left it as it is: move it away (every home re-registers "
                               "its ranges at its next launch)") from exc

    def _save(self, ranges: list[Range]) -> None:
        _replace(self.dir / REGISTRY, {"version": 1, "ranges": [
            asdict(r) for r in sorted(ranges, key=lambda r: r.first)]})


@dataclass(frozen=True)
class Pinned:
    """The host CPUs the active instance ``owner`` of ``home`` is pinned to."""

    home: str
    owner: str
    cpus: tuple[int, ...]


class HostCpus:
    """The CPUs every home's active instances are pinned to (for placement, not a limit)."""

    FILE = "cpus.json"

    def __init__(self, home: Path, directory: Path | None = None) -> None:
        """``home``: this ``POPEK_HOME``; ``directory``: the registry's (:data:`HOST_DIR`)."""
        self.ids = HostIds(home, directory)
        self.home = self.ids.home

    def elsewhere(self) -> list[tuple[int, ...]]:
        """The CPU sets of the active instances of the other homes that still exist."""
        with self.ids._locked(fcntl.LOCK_SH):
            return [p.cpus for p in self._load() if p.home != self.home
                    and (Path(p.home) / "state.db").exists()]

    def publish(self, mine: Callable[[], dict[str, tuple[int, ...]]]) -> None:
        """Make this home's entries ``mine()`` (owner -> CPUs, read under the lock).

        The file is written only when they changed; homes that are gone are dropped.
        """
        with self.ids._locked(fcntl.LOCK_EX):
            old = self._load()
            new = [p for p in old if p.home != self.home
                   and (Path(p.home) / "state.db").exists()]
            new += [Pinned(self.home, owner, tuple(cpus))
                    for owner, cpus in sorted(mine().items()) if cpus]
            if sorted(map(repr, new)) != sorted(map(repr, old)):
                self._save(new)

    def _load(self) -> list[Pinned]:
        path = self.ids.dir / self.FILE
        try:
            doc = json.loads(path.read_bytes())
            return [Pinned(str(p["home"]), str(p["owner"]), tuple(int(c) for c in p["cpus"]))
                    for p in doc["pinned"]]
        except FileNotFoundError:
            return []
        except (ValueError, KeyError, TypeError):
            return []  # placement only: a damaged file is rebuilt by the next publish

    def _save(self, pinned: list[Pinned]) -> None:
        _replace(self.ids.dir / self.FILE, {"version": 1, "pinned": [
            {"home": p.home, "owner": p.owner, "cpus": list(p.cpus)} for p in pinned]})


def _replace(path: Path, doc: object) -> None:
    """Write ``doc`` as JSON to ``path`` whole: beside it, synced, renamed (mode 0600)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(json.dumps(doc, indent=1).encode())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
