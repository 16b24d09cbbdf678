"""Two POPEK_HOMEs on one host share nothing: uids, cgroups and limits (issue 12, point 3).

Before the fix every home gave its first VM uid 900000000 and its first
container the ids from 1000000000, and put an instance ``NAME`` in the cgroup
``popek/default-NAME`` whatever the home.  So the QEMU of one home could read
the memory of the other home's QEMU with ``process_vm_readv`` and attach to it
with ``ptrace`` (same uid), reach its swtpm, and the second launch of a name
rewrote the first one's limits, which stayed changed after it was deleted.

Here both homes run a VM and a container of the same name.  The attack runs
as the uid of home A's QEMU against home B's QEMU and swtpm; the same calls
against A's own QEMU succeed, which shows the attack is real and that only
the uids now tell the two apart.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from framework import Home, popek, require_root_and_tools
from popek.engines import cgroupfs
from popek.state.hostwide import HOST_DIR, REGISTRY

require_root_and_tools()

VM, CT = "h2-same", "h2-same-ct"

#: run as an instance's uid (no capabilities, no groups): try to read and attach to ``pid``
ATTACK = r"""
import ctypes, errno, json, socket, sys
libc = ctypes.CDLL(None, use_errno=True)
class iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]
pid, addr, sock = int(sys.argv[1]), int(sys.argv[2], 16), sys.argv[3]
buf = ctypes.create_string_buffer(64)
local, remote = iovec(ctypes.addressof(buf), 64), iovec(addr, 64)
libc.process_vm_readv.restype = ctypes.c_ssize_t
n = libc.process_vm_readv(pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
out = {"uid": __import__("os").getuid(),
       "process_vm_readv": n if n >= 0 else errno.errorcode[ctypes.get_errno()]}
if sys.argv[4] == "ptrace":
    rc = libc.ptrace(16, pid, 0, 0)  # PTRACE_ATTACH
    out["ptrace"] = rc if rc == 0 else errno.errorcode[ctypes.get_errno()]
    if rc == 0:
        libc.ptrace(17, pid, 0, 0)  # PTRACE_DETACH
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(sock)
    out["swtpm"] = "connected"
except OSError as exc:
    out["swtpm"] = errno.errorcode[exc.errno]
print(json.dumps(out))
"""


def _attack(as_uid: int, pid: int, swtpm: Path, ptrace: bool) -> dict[str, Any]:
    """Run :data:`ATTACK` as ``as_uid`` (gid the same, no supplementary groups).

    The system's Python: the test's own lies under /root, which that uid cannot reach.
    """
    maps = Path(f"/proc/{pid}/maps").read_text().splitlines()
    addr = next(line.split("-")[0] for line in maps if line.split()[1].startswith("r"))
    res = subprocess.run(["/usr/bin/python3", "-S", "-c", ATTACK, str(pid), addr, str(swtpm),
                          "ptrace" if ptrace else "-"], user=as_uid, group=as_uid,
                         extra_groups=[], capture_output=True, text=True, timeout=60,
                         check=True, cwd="/")
    return dict(json.loads(res.stdout))


def _info(home: Home, name: str) -> dict[str, Any]:
    return dict(json.loads(home.popek("info", name, "--format", "json").stdout))


def _memory_limit(cgroup: str) -> int:
    """The memory limit of ``cgroup`` (relative to each hierarchy), v1 or v2."""
    root = cgroupfs.ROOT
    if cgroupfs.is_v2():
        return int((root / cgroup / "memory.max").read_text())
    return int((root / "memory" / cgroup / "memory.limit_in_bytes").read_text())


def _registry() -> list[dict[str, Any]]:
    path = HOST_DIR / REGISTRY
    if not path.exists():
        return []
    with contextlib.closing(sqlite3.connect(path)) as db:
        return [{"first": f, "size": n, "home": h, "owner": o}
                for f, n, h, o in db.execute("SELECT first, size, home, owner FROM ranges")]


@pytest.fixture(scope="module")
def homes(popek_home: Path, minimal_image: str) -> Iterator[tuple[Home, Home]]:
    a, b = Home(popek_home), Home(popek_home)
    try:
        for h in (a, b):
            h.popek("trust", "allow-unsigned")  # the copied image is unsigned in each home
        for h, memory in ((a, "256MiB"), (b, "384MiB")):
            h.popek("launch", "minimal", VM, "--memory", memory)
            h.popek("launch", "minimal", CT, "--container", "--memory", memory)
        yield a, b
    finally:
        a.close()
        b.close()


def test_same_names_get_their_own_uids_and_cgroups(homes: tuple[Home, Home]) -> None:
    a, b = homes
    for name in (VM, CT):
        ia, ib = _info(a, name), _info(b, name)
        assert ia["uid"] != ib["uid"], name  # before: the same uid in both homes
        mine = {(r["first"], r["home"]) for r in _registry()}
        assert (ia["uid"], str(a.path.resolve())) in mine
        assert (ib["uid"], str(b.path.resolve())) in mine
    # the cgroups of the same name are two, and each keeps its own home's limit
    cgroups = {}
    for h, limit in ((a, 256 << 20), (b, 384 << 20)):
        cgroups[h.path] = cg = _cgroups_of(h)
        assert _memory_limit(cg[CT]) == limit  # before: the second launch's, for both
        assert _memory_limit(cg[VM]) >= limit  # QEMU's: the guest's RAM plus its overhead
    assert set(cgroups[a.path].values()).isdisjoint(cgroups[b.path].values())


def _cgroups_of(home: Home) -> dict[str, str]:
    """The cgroup (relative path) of each instance of ``home``, read from its processes."""
    out = {}
    for name in (VM, CT):
        pid = int(_info(home, name)["pid"])
        line = next(ln for ln in Path(f"/proc/{pid}/cgroup").read_text().splitlines()
                    if ln.split(":")[1] in ("memory", ""))
        out[name] = line.split(":", 2)[2].lstrip("/")
        assert out[name].startswith("popek/"), out[name]
    return out


def test_qemu_of_one_home_cannot_read_or_trace_anothers(homes: tuple[Home, Home]) -> None:
    a, b = homes
    ia, ib = _info(a, VM), _info(b, VM)
    sock_a, sock_b = (Path(i["workdir"]) / "swtpm.sock" for i in (ia, ib))
    assert sock_a.exists() and sock_b.exists()
    # the attack works where the uid matches: A's QEMU uid against A's own QEMU
    own = _attack(ia["uid"], ia["pid"], sock_a, ptrace=False)
    assert own["uid"] == ia["uid"] and own["process_vm_readv"] == 64, own
    # against the other home's QEMU and swtpm it is refused, for the uid alone
    other = _attack(ia["uid"], ib["pid"], sock_b, ptrace=True)
    assert other == {"uid": ia["uid"], "process_vm_readv": "EPERM", "ptrace": "EPERM",
                     "swtpm": "EACCES"}, other
    workdir_b = Path(ib["workdir"]).stat()
    assert workdir_b.st_uid == ib["uid"] != ia["uid"] and workdir_b.st_mode & 0o077 == 0


def test_deleting_frees_the_range_and_leaves_the_other_home_alone(
        homes: tuple[Home, Home]) -> None:
    a, b = homes
    before = _cgroups_of(a)
    uid_b = _info(b, CT)["uid"]
    b.popek("delete", "--force", CT)
    assert uid_b not in {r["first"] for r in _registry()}  # the host-wide range is free
    assert _memory_limit(before[CT]) == 256 << 20  # a's container keeps its own limit
    assert popek("list", "--format", "json", env=a.env).returncode == 0
    assert _info(a, CT)["state"] == "running"
    assert os.path.isdir(cgroupfs.ROOT / ("" if cgroupfs.is_v2() else "memory") / before[CT])
