"""bench/storage_io.py: I/O inside a guest on a popek volume against a plain raw file (issue 15).

The claim under test (issue 15, "Benchmark"): **a guest reads and writes a
popek block volume sequentially at 90 % or more of the speed it gets from
the same QEMU given a plain raw file as its virtio-blk disk**; 4 KiB random
reads and writes are reported beside it (no target).

Each round runs, one VM at a time (the order reversed every other round):

* **popek, one per case** (``CASES``): a volume ``iobench`` of a private
  ``POPEK_HOME``'s pool (``popek storage volume create POOL iobench --size S``),
  ``popek launch minimal iob --vcpus 1 --memory 256MiB --disk POOL/iobench``,
  the guest script run by ``popek exec iob -- sh -c SCRIPT``, then
  ``popek delete --force iob`` (the volume stays for the next round);
* **plain**: the same QEMU binary and argv popek used (``qemu.argv.json`` of
  the first popek launch: machine, CPU, memory, devices), started by hand as
  root, with the image's own kernel and initrd, no vTPM, and popek's volume
  replaced by a raw file of the same size (``-blockdev`` file + raw, the same
  default cache mode as popek's nodes, a virtio-blk device with the same
  serial on the same root port), pinned with ``taskset`` to the CPUs popek
  pinned its QEMU to (popek pins a VM to as many CPUs as vCPUs and caps its
  cgroup at that; under TCG the guest's CPU speed is in every figure, so the
  plain side gets the same CPU envelope), in a cgroup with the same
  memory and CPU limits as popek's (v2 or v1) (the host page cache of a disk's
  file counts against its QEMU's cgroup); ``--unpinned`` runs it on every
  CPU and outside any cgroup; the same guest script typed on its serial console (the image's root
  shell).

The guest script (busybox only: ``dd`` with ``iflag=direct``/``oflag=direct``,
``awk``; the clock: the "now at N nsecs" line of ``/proc/timer_list``, as
busybox ``date`` has no ``%N``) finds the disk by its serial, then times in the
guest: a sequential write and a sequential read of the whole disk (``bs=1M``),
and ``--ops`` 4 KiB random reads and writes, each one ``dd`` with ``count=1``
at an offset from busybox ``awk``'s ``rand()`` with a fixed seed (the same
offsets on both sides).  Each random op spawns a ``dd`` process: that cost is
on both sides of the ratio, and it is measured apart (the same loop with
``count=0``: open and close, no I/O) and reported as ``spawn_ms_per_op``.
Before the first round each disk is written whole once (not timed), so that
no side pays first allocation in the timed rounds.

Beside the raw file, the plain QEMU also runs on the same kind of storage as an
encrypted or Ceph case (``plain-luks``: a qcow2 with LUKS made with the options
popek gives its encrypted volumes; ``plain-rbd``: a raw RBD image of the same
cluster, opened through the same ``rbd`` node popek gave QEMU), so each case
has two ratios: against the raw file (the issue's claim) and against the same
storage by hand (what popek itself costs, apart from encryption or Ceph).

Reported per case: medians over ``--runs`` rounds of MB/s (sequential) and
IOPS (random), ratios popek/plain of the medians, and the verdict for the
sequential ratios against 0.9.  Results: ``bench/results/storage-io-<UTC>.json``
and ``storage-io-latest.{json,png}``.  Run as root:
``.venv/bin/python bench/storage_io.py [--runs N] [--size-mib M] [--ops K]``.
Everything it started is stopped and removed at the end, also on failure or
SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import itertools
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CACHE, POPEK, RESULTS, BenchError, _mkdir_public, _summary

IMAGE = "minimal"
MEMORY = "256MiB"
VM = "iob"
VOLUME = "iobench"
#: popek gives a disk its volume's name as serial (iobench-CASE); the plain disk gets iobench-plain
SERIAL = VOLUME
#: the guest finds its disk by serial, the same way on every side
FIND_DISK = ("d=; for b in /sys/block/vd*; do case \"$(cat $b/serial 2>/dev/null)\" in "
             f"{SERIAL}-*) d=/dev/${{b##*/}};; esac; done; "
             "[ -b \"$d\" ] || echo IOB nodisk $((0)); ")
TARGET_SEQ_RATIO = 0.9
SEED = 15
#: each case's plain side on the same kind of storage (popek's own cost, apart from the
#: storage's): the case's ratio to it is reported beside the ratio to the raw file
ENGINE_BASELINE = {"dir": "plain", "dir-encrypted": "plain-luks", "ceph": "plain-rbd"}
PLAIN_RBD_IMAGE = "popek-bench-plain"
#: the passphrase of the plain LUKS qcow2 (a throwaway, in 0600 files of the bench's home)
LUKS_KEY = "popek-bench-plain-luks"
#: the vTPM's QEMU options (the plain guest has no swtpm): option -> value prefix
TPM_OPTIONS = {"-chardev": "socket,id=chrtpm,", "-tpmdev": "", "-fw_cfg": ""}
TPM_DEVICE = "tpm-crb,"
#: not anchored at a line's start: the console's prompt precedes the first line of output
RESULT = re.compile(r"IOB (\w+) (\d+)\r?$", re.M)
PLAIN_CGROUP = "popek-bench-io-plain"
END = "IOB-2END"  # the script prints IOB-$((1+1))END: its echo on the console never matches


def _on_term(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


@dataclass
class Case:
    """One popek side: a pool and the options of ``popek storage volume create``.

    ``needs`` returns why the case cannot run on this checkout (``None``: it
    can); a case that cannot run is reported with that reason, never dropped.
    """

    name: str
    pool: str
    create_opts: list[str] = field(default_factory=list)
    needs: Callable[[Bench], str | None] = lambda _b: None
    prepare: Callable[[Bench], None] = lambda _b: None


def _needs_encrypt(b: Bench) -> str | None:
    res = subprocess.run([POPEK, "storage", "volume", "create", "--help"], env=b.env,
                         capture_output=True, text=True, check=False)
    if "--encrypt" not in res.stdout:
        return "popek storage volume create has no --encrypt on this checkout (not merged yet)"
    return None


def _ceph_framework() -> Any:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from framework import ceph

    return ceph


def _needs_ceph(_b: Bench) -> str | None:
    try:
        why = str(_ceph_framework().missing())
    except ImportError as exc:
        return f"no tests/framework/ceph.py on this checkout (no ceph driver): {exc}"
    return f"no Ceph cluster can be made here: {why}" if why else None


def _prepare_ceph(b: Bench) -> None:
    """A real single-host Ceph cluster (tests/framework/ceph.py: 1 mon, 1 mgr, 3 OSDs on
    sparse files) and the pool ``ceph`` of the private home on its RBD pool."""
    if b.ceph is None:
        ceph = _ceph_framework()
        b.ceph = ceph.CephCluster()
        b.ceph.start()
        b.popek("storage", "create", "ceph", "ceph", f"conf={b.ceph.conf}",
                f"keyring={b.ceph.keyring}", f"pool={ceph.RBD_POOL}", f"client={ceph.CLIENT}")
        b.pools.append("ceph")


CASES = [
    Case("dir", "local"),
    Case("dir-encrypted", "local", ["--encrypt"], needs=_needs_encrypt),
    Case("ceph", "ceph", needs=_needs_ceph, prepare=_prepare_ceph),
]


def guest_script(size_mib: int, ops: int) -> str:
    """The shell line run in the guest (both sides): prints ``IOB <test> <ns>`` lines."""
    blocks = size_mib * 256
    loop = "for o in $offs; do dd {} bs=4096 count={n} {pos}=$o {flag} 2>/dev/null; done"
    rr = loop.format("if=$d of=/dev/null", n=1, pos="skip", flag="iflag=direct")
    rw = loop.format("if=/dev/zero of=$d", n=1, pos="seek", flag="oflag=direct")
    sp = loop.format("if=$d of=/dev/null", n=0, pos="skip", flag="iflag=direct")
    return (
        FIND_DISK +
        f"offs=$(awk -v s={SEED} 'BEGIN{{srand(s); for(i=0;i<{ops};i++) "
        f"print int(rand()*{blocks})}}'); "
        # busybox date has no %N here: the kernel's monotonic clock in ns from timer_list
        "ns(){ awk 'NR==3{print $3;exit}' /proc/timer_list; }; "
        "t(){ a=$(ns); \"$@\"; z=$(ns); echo IOB $k $((z-a)); }; "
        f"k=seq_write t dd if=/dev/zero of=$d bs=1M count={size_mib} oflag=direct 2>/dev/null; "
        f"k=seq_read t dd if=$d of=/dev/null bs=1M count={size_mib} iflag=direct 2>/dev/null; "
        f"k=rand_read t eval '{rr}'; "
        f"k=rand_write t eval '{rw}'; "
        f"k=spawn t eval '{sp}'; "
        "echo IOB-$((1+1))END"
    )


def fill_script(size_mib: int) -> str:
    """Write the whole disk once (not timed)."""
    return (FIND_DISK + f"dd if=/dev/zero of=$d bs=1M count={size_mib} oflag=direct "
            "2>/dev/null; echo IOB-$((1+1))END")


def parse(out: str, want: frozenset[str] = frozenset()) -> dict[str, int]:
    """The ``IOB <test> <ns>`` lines of a script's output; raises when it did not finish."""
    if END not in out:
        raise BenchError(f"the guest script did not finish: {out[-400:]!r}")
    got = {k: int(v) for k, v in RESULT.findall(out)}
    if "nodisk" in got:
        raise BenchError(f"the guest sees no disk with serial {SERIAL}-*")
    if want - got.keys():
        raise BenchError(f"no {sorted(want - got.keys())} in the guest's output: {out[-400:]!r}")
    return got


def cpus_allowed(pid: int) -> str:
    """The CPUs ``pid`` may run on (``Cpus_allowed_list``), as taskset takes them."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Cpus_allowed_list:"):
            return line.split()[1]
    raise BenchError(f"no Cpus_allowed_list for pid {pid}")


def _cgroup_dir(pid: int, root: Path, rel: str) -> Path | None:
    """The directory under ``root`` whose cgroup.procs lists ``pid``: ``rel`` first, then
    popek's cgroups (QEMU runs in a cgroup namespace of its own and may see "/")."""
    for procs in [root / rel.lstrip("/") / "cgroup.procs", *root.glob("popek*/cgroup.procs"),
                  *root.glob("popek*/*/cgroup.procs"), *root.glob("popek*/*/*/cgroup.procs")]:
        with contextlib.suppress(OSError):
            if str(pid) in procs.read_text().split():
                return procs.parent
    return None


def cgroup_limits(pid: int) -> dict[str, str]:
    """The memory and CPU limits of ``pid``'s cgroup, as v2 names them (read on v1 or v2);
    empty when they cannot be found."""
    lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    base = Path("/sys/fs/cgroup")
    v2 = [ln[3:] for ln in lines if ln.startswith("0::")]
    with contextlib.suppress(OSError, ValueError):
        if v2 and (base / "cgroup.controllers").exists():
            d = _cgroup_dir(pid, base, v2[0])
            if d is not None:
                return {"path": str(d), **{f: (d / f).read_text().strip()
                                           for f in ("memory.max", "cpu.max")}}
            return {}
        rels = {c: ln.split(":", 2)[2] for ln in lines for c in ln.split(":", 2)[1].split(",")}
        mem = _cgroup_dir(pid, base / "memory", rels.get("memory", "/"))
        cpu = _cgroup_dir(pid, base / "cpu", rels.get("cpu", "/"))
        if mem is None or cpu is None:
            return {}
        quota = int((cpu / "cpu.cfs_quota_us").read_text())
        period = (cpu / "cpu.cfs_period_us").read_text().strip()
        return {"path": f"{mem} {cpu}",
                "memory.max": (mem / "memory.limit_in_bytes").read_text().strip(),
                "cpu.max": f"{quota if quota > 0 else 'max'} {period}"}
    return {}


class SerialShell:
    """The root shell on a plain QEMU's serial console (a Unix socket chardev)."""

    def __init__(self, path: Path, proc: subprocess.Popen[bytes], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        while True:
            try:
                self.sock.connect(str(path))
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise BenchError("the plain QEMU's console socket never opened") from None
                time.sleep(0.05)
        self.proc = proc
        self.buf = b""
        self.read_until(b"popek-guest: ready", deadline)
        self.sock.sendall(b"\nstty -echo\n")
        self.sock.sendall(b"echo IOB-$((1+1))END\n")
        self.read_until(END.encode(), deadline)

    def read_until(self, token: bytes, deadline: float) -> str:
        """Everything the console printed until ``token``, which ends it."""
        while token not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0 or self.proc.poll() is not None:
                raise BenchError(f"no {token!r} on the plain guest's console: "
                                 f"{self.buf[-400:]!r}")
            self.sock.settimeout(min(left, 1.0))
            with contextlib.suppress(TimeoutError):
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise BenchError("the plain guest's console closed")
                self.buf += chunk
        out, _, self.buf = self.buf.partition(token)
        return (out + token).decode(errors="replace")

    def run(self, line: str, timeout: float) -> str:
        """Type ``line`` on the console and return its output."""
        if len(line) > 3500:
            raise BenchError("a guest line longer than the tty's canonical buffer")
        self.sock.sendall(line.encode() + b"\n")
        return self.read_until(END.encode(), time.monotonic() + timeout)

    def close(self) -> None:
        """Close the socket."""
        self.sock.close()


class Bench:
    """The private home, its VM and volumes, and the plain QEMU; cleaned up at the end."""

    def __init__(self, size_mib: int, pin: bool = True) -> None:
        self.home = _mkdir_public("popek-bench-io-")
        self.env = {**os.environ, "POPEK_HOME": str(self.home), "POPEK_CACHE": str(CACHE)}
        self.size_mib = size_mib
        self.raw_file = self.home / "plain.raw"
        self.plain_dir = self.home / "plain"
        self.plain_argv: list[str] = []
        self.proc: subprocess.Popen[bytes] | None = None
        self.volumes: list[str] = []
        self.vm_up = False
        self.pin = pin
        self.popek_cpus = ""
        self.popek_limits: dict[str, str] = {}
        self.ceph: Any = None
        self.pools: list[str] = []
        self.cgroup_made = False
        self.plain_bus = "pcie.0"
        self.luks_file = self.home / "plain-luks.qcow2"
        self.rbd_node: dict[str, Any] = {}
        self.rbd_key = ""
        self.rbd_made = False

    def popek(self, *args: str, timeout: float = 600) -> str:
        """Run a popek command in the private home; raise with its output when it fails."""
        res = subprocess.run([POPEK, *args], env=self.env, capture_output=True, text=True,
                             stdin=subprocess.DEVNULL, timeout=timeout, check=False)
        if res.returncode != 0:
            raise BenchError(f"popek {' '.join(args[:4])} exited {res.returncode}: "
                             f"{(res.stdout + res.stderr).strip()[-400:]}")
        return res.stdout

    def workdir(self) -> Path:
        """The popek VM's working directory."""
        return self.home / "instances" / "default" / VM

    # -- popek side
    def popek_session(self, case: Case, lines: list[str], timeout: float) -> list[str]:
        """Launch the VM with the case's volume, run ``lines`` by exec, delete the VM."""
        self.popek("launch", IMAGE, VM, "--vcpus", "1", "--memory", MEMORY,
                   "--disk", f"{case.pool}/{VOLUME}-{case.name}")
        self.vm_up = True
        try:
            if not self.plain_argv:
                self.plain_argv = self.to_plain(
                    json.loads((self.workdir() / "qemu.argv.json").read_text()))
                pid = int((self.workdir() / "qemu.pid").read_text().strip())
                self.popek_cpus = cpus_allowed(pid)
                self.popek_limits = cgroup_limits(pid)
                if self.pin:
                    self.plain_argv = ["taskset", "-c", self.popek_cpus, *self.plain_argv]
            if case.name == "ceph" and not self.rbd_node:
                self.note_rbd(json.loads((self.workdir() / "qemu.argv.json").read_text()))
            return [self.popek("exec", VM, "--no-stdin", "--timeout", str(timeout), "--",
                               "sh", "-c", line, timeout=timeout + 30) for line in lines]
        finally:
            self.popek("delete", "--force", VM)
            self.vm_up = False

    # -- plain side
    def to_plain(self, argv: list[str]) -> list[str]:
        """popek's argv, with a raw file instead of the volume, no vTPM, the image's boot
        files, paths moved to the plain directory and the console a plain socket."""
        work = str(self.workdir())
        image = self.home / "images" / IMAGE
        manifest = json.loads((image / "manifest.json").read_text())
        boot = {f"{work}/{role}.verified": str(image / manifest[role])
                for role in ("kernel", "initrd")}
        out: list[str] = []
        bus = "pcie.0"
        it = iter(argv)
        out.append(next(it))
        for opt in it:
            val = next(it, "") if opt.startswith("-") and opt not in ("-nodefaults",
                                                                     "-no-user-config",
                                                                     "-no-reboot") else None
            if val is None:
                out.append(opt)
                continue
            if opt in TPM_OPTIONS and val.startswith(TPM_OPTIONS[opt]) and \
                    (opt != "-chardev" or "chrtpm" in val) and (opt != "-fw_cfg" or "popek" in val):
                continue
            if opt == "-device" and val.startswith(TPM_DEVICE):
                continue
            if opt in ("-add-fd", "-blockdev", "-pidfile"):
                continue
            if opt == "-device" and val.startswith("{"):
                dev = json.loads(val)
                if dev.get("driver") == "virtio-blk-pci":
                    bus = str(dev.get("bus", bus))
                    continue
            if opt == "-chardev" and val.startswith("socket,id=console,"):
                val = f"socket,id=console,path={self.plain_dir / 'console.sock'}," \
                      "server=on,wait=off"
            out += [opt, boot.get(val) or val.replace(work, str(self.plain_dir))]
        self.plain_bus = bus
        return out

    def plain_disk(self, side: str) -> list[str]:
        """The disk of plain side ``side``, on popek's disk's root port, serial
        ``iobench-plain``: a raw file (``plain``), a qcow2 with LUKS made with the options
        popek's encrypted volumes get (``plain-luks``), or a raw RBD image of the same
        cluster opened by QEMU's ``rbd`` driver as popek opens its own (``plain-rbd``);
        the keys of the last two from 0600 files in the plain directory."""
        top: dict[str, object]
        argv: list[str] = []
        if side == "plain":
            argv += ["-blockdev", json.dumps({"driver": "file", "node-name": "raw0-file",
                                             "filename": str(self.raw_file)})]
            top = {"driver": "raw", "node-name": "raw0", "file": "raw0-file"}
        elif side == "plain-luks":
            key = self.plain_dir / "luks.key"
            _write_private(key, LUKS_KEY)
            argv += ["-object", f"secret,id=plainluks-key,file={key}",
                     "-blockdev", json.dumps({"driver": "file", "node-name": "raw0-file",
                                             "filename": str(self.luks_file)})]
            top = {"driver": "qcow2", "node-name": "raw0", "file": "raw0-file",
                   "encrypt": {"format": "luks", "key-secret": "plainluks-key"}}
        elif side == "plain-rbd":
            key = self.plain_dir / "rbd.key"
            _write_private(key, self.rbd_key)
            argv += ["-object", f"secret,id=plainrbd-key,format=base64,file={key}"]
            top = {**self.rbd_node, "node-name": "raw0", "image": PLAIN_RBD_IMAGE,
                   "key-secret": "plainrbd-key"}
        else:
            raise BenchError(f"no plain side {side!r}")
        return [*argv, "-blockdev", json.dumps(top),
                "-device", json.dumps({"driver": "virtio-blk-pci", "drive": "raw0",
                                       "id": "disk0", "serial": f"{SERIAL}-plain",
                                       "bus": self.plain_bus})]

    def make_plain_disks(self, sides: list[str]) -> None:
        """The raw file, and the LUKS qcow2 and the RBD image the plain sides in ``sides``
        need, all of the volumes' size (each made once; the RBD image after popek's first
        ceph launch, whose ``rbd`` node it copies)."""
        size = self.size_mib << 20
        if not self.raw_file.exists():
            with open(self.raw_file, "wb") as f:
                f.truncate(size)
        if "plain-luks" in sides and not self.luks_file.exists():
            from popek.storage.dirpool import ENCRYPT_OPTS, SECRET_ID

            key = self.home / "luks-create.key"
            _write_private(key, LUKS_KEY)
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "--object",
                            f"secret,id={SECRET_ID},file={key}", "-o", ENCRYPT_OPTS,
                            str(self.luks_file), str(size)], check=True)
        if "plain-rbd" in sides and not self.rbd_made:
            if not self.rbd_node:
                raise BenchError("the plain RBD side needs popek's ceph launch first")
            self.rbd_cli("create", "--size", f"{self.size_mib}M",
                         f"{self.rbd_node['pool']}/{PLAIN_RBD_IMAGE}")
            self.rbd_made = True

    def rbd_cli(self, *args: str) -> None:
        """Run Ceph's ``rbd`` tool on the bench cluster as its admin."""
        res = subprocess.run(["rbd", "-c", str(self.ceph.conf), "--keyring",
                              str(self.ceph.admin_keyring), *args],
                             capture_output=True, text=True, timeout=120, check=False)
        if res.returncode != 0:
            raise BenchError(f"rbd {' '.join(args)}: {res.stderr.strip()[-300:]}")

    def note_rbd(self, argv: list[str]) -> None:
        """Keep the ``rbd`` node popek gave its Ceph volume (monitors, user, pool, cache
        options) and the client's key, for the plain RBD side."""
        for opt, val in itertools.pairwise(argv):
            if opt == "-blockdev" and val.startswith("{") and \
                    json.loads(val).get("driver") == "rbd":
                self.rbd_node = json.loads(val)
        keyring = Path(self.ceph.keyring).read_text()
        m = re.search(r"^\s*key\s*=\s*(\S+)", keyring, re.M)
        if not self.rbd_node or m is None:
            raise BenchError("no rbd node in popek's QEMU argv, or no key in the keyring")
        self.rbd_key = m.group(1)

    def plain_session(self, side: str, lines: list[str], timeout: float) -> list[str]:
        """Start the plain QEMU of ``side``, type ``lines`` on its console, stop it."""
        if self.plain_dir.exists():
            shutil.rmtree(self.plain_dir)
        self.plain_dir.mkdir()
        log = open(self.plain_dir / "qemu.log", "wb")  # noqa: SIM115 - closed below
        join = self.plain_cgroup()

        def enter() -> None:  # in the child, before QEMU: the same cgroup limits as popek's
            for f in join:
                f.write_text("0")

        self.proc = subprocess.Popen([*self.plain_argv, *self.plain_disk(side)],
                                     stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                     start_new_session=True, cwd=self.plain_dir,
                                     preexec_fn=enter)
        try:
            shell = SerialShell(self.plain_dir / "console.sock", self.proc, 300)
            try:
                return [shell.run(line, timeout) for line in lines]
            finally:
                shell.close()
        except BenchError as exc:
            qlog = (self.plain_dir / "qemu.log").read_text()[-300:]
            raise BenchError(f"{exc}; qemu: {qlog}") from None
        finally:
            self.stop_plain()
            log.close()

    def plain_cgroup(self) -> list[Path]:
        """A cgroup with popek's QEMU's memory and CPU limits (pinned runs only): popek's
        cgroup holds the page cache of the volume's file too, so the plain side gets the
        same budget.  Returns the files to join it by."""
        from popek.engines import cgroupfs

        if not self.pin or "memory.max" not in self.popek_limits:
            return []
        quota, period = self.popek_limits["cpu.max"].split()
        cpus = int(quota) / int(period) if quota != "max" else float(os.cpu_count() or 1)
        mem = self.popek_limits["memory.max"]
        limits = cgroupfs.Limits(cpus=cpus, memory=min(int(mem), 1 << 40) if mem != "max"
                                 else 1 << 40,
                                 pids=512)
        join = cgroupfs.create(PLAIN_CGROUP, limits)
        self.cgroup_made = True
        return join

    def stop_plain(self) -> None:
        """Kill the plain QEMU, if it runs."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def cleanup(self) -> None:
        """Stop and remove everything this benchmark made."""
        self.stop_plain()
        if self.cgroup_made:
            from popek.engines import cgroupfs

            with contextlib.suppress(Exception):
                cgroupfs.remove(PLAIN_CGROUP)
        left = []
        if self.vm_up:
            try:
                self.popek("delete", "--force", VM)
            except (BenchError, subprocess.SubprocessError) as exc:
                left.append(f"{VM}: {exc}")
        for ref in self.volumes:
            pool, _, name = ref.partition("/")
            try:
                self.popek("storage", "volume", "delete", pool, name)
            except (BenchError, subprocess.SubprocessError) as exc:
                left.append(f"{ref}: {exc}")
        for pool in self.pools:
            try:
                self.popek("storage", "delete", pool)
            except (BenchError, subprocess.SubprocessError) as exc:
                left.append(f"pool {pool}: {exc}")
        if self.rbd_made:
            try:
                self.rbd_cli("rm", f"{self.rbd_node['pool']}/{PLAIN_RBD_IMAGE}")
            except (BenchError, subprocess.SubprocessError) as exc:
                left.append(f"rbd image {PLAIN_RBD_IMAGE}: {exc}")
        if self.ceph is not None:
            self.ceph.stop()
        if left:
            print(f"storage_io.py: removal failed, {self.home} kept: {left[:3]}",
                  file=sys.stderr)
        else:
            shutil.rmtree(self.home, ignore_errors=True)


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to a new file only root can read."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def figures(ns: dict[str, int], size_mib: int, ops: int) -> dict[str, float]:
    """MB/s (MiB per second) and IOPS of one session's timings."""
    s = {k: v / 1e9 for k, v in ns.items()}
    return {"seq_write_mib_s": round(size_mib / s["seq_write"], 2),
            "seq_read_mib_s": round(size_mib / s["seq_read"], 2),
            "rand_read_iops": round(ops / s["rand_read"], 2),
            "rand_write_iops": round(ops / s["rand_write"], 2),
            "spawn_ms_per_op": round(s["spawn"] * 1000 / ops, 3),
            "rand_read_net_ms_per_op": round((s["rand_read"] - s["spawn"]) * 1000 / ops, 3),
            "rand_write_net_ms_per_op": round((s["rand_write"] - s["spawn"]) * 1000 / ops, 3)}


TESTS = frozenset({"seq_write", "seq_read", "rand_read", "rand_write", "spawn"})
#: the first four are compared popek/plain; the rest are context (the spawn and what an
#: op costs beyond it: its loop's time less the count=0 loop's, per op)
METRICS = ("seq_write_mib_s", "seq_read_mib_s", "rand_read_iops", "rand_write_iops",
           "spawn_ms_per_op", "rand_read_net_ms_per_op", "rand_write_net_ms_per_op")


def run(args: argparse.Namespace, b: Bench) -> dict[str, Any]:
    """Make the volumes and the raw file, fill them, run the rounds, analyse."""
    load_start = list(os.getloadavg())
    b.popek("image", "build", IMAGE, timeout=900)
    cases, skipped = [], {}
    for c in CASES:
        reason = c.needs(b)
        if reason:
            skipped[c.name] = reason
            print(f"case {c.name}: not run: {reason}", flush=True)
            continue
        c.prepare(b)
        b.popek("storage", "volume", "create", c.pool, f"{VOLUME}-{c.name}", "--size",
                f"{args.size_mib}MiB", *c.create_opts)
        b.volumes.append(f"{c.pool}/{VOLUME}-{c.name}")
        cases.append(c)
    plains = ["plain", *(ENGINE_BASELINE[c.name] for c in cases
                         if ENGINE_BASELINE[c.name] != "plain")]
    script = guest_script(args.size_mib, args.ops)
    fill = fill_script(args.size_mib)
    timeout = 900.0
    samples: dict[str, list[dict[str, Any]]] = {c.name: [] for c in cases}
    samples.update({p: [] for p in plains})
    sides: list[str] = [c.name for c in cases] + plains
    by_name = {c.name: c for c in cases}
    for r in range(args.runs + 1):  # round 0: fill every disk, untimed
        order = sides if r % 2 or r == 0 else list(reversed(sides))  # popek first: its argv
        for side in order:
            lines = [fill] if r == 0 else [script]
            t0 = time.monotonic()
            if side in plains:
                b.make_plain_disks([side])
                outs = b.plain_session(side, lines, timeout)
            else:
                outs = b.popek_session(by_name[side], lines, timeout)
            if r == 0:
                parse(outs[0])
                print(f"  filled {side} ({time.monotonic() - t0:.0f}s with boot)", flush=True)
                continue
            fig = figures(parse(outs[0], TESTS), args.size_mib, args.ops)
            samples[side].append({"round": r, **fig, "load": list(os.getloadavg())})
            print(f"  round {r} {side}: {fig}", flush=True)
    med = {side: {m: round(statistics.median(s[m] for s in samples[side]), 2)
                  for m in METRICS} for side in sides}
    ratios = {c.name: {m: round(med[c.name][m] / med["plain"][m], 3) for m in METRICS[:4]}
              for c in cases}
    engine = {c.name: {"baseline": ENGINE_BASELINE[c.name],
                       **{m: round(med[c.name][m] / med[ENGINE_BASELINE[c.name]][m], 3)
                          for m in METRICS[:4]}} for c in cases}
    verdict = {c: {"seq_write": ratios[c]["seq_write_mib_s"] >= TARGET_SEQ_RATIO,
                   "seq_read": ratios[c]["seq_read_mib_s"] >= TARGET_SEQ_RATIO}
               for c in ratios}
    engine_verdict = {c: {"seq_write": engine[c]["seq_write_mib_s"] >= TARGET_SEQ_RATIO,
                          "seq_read": engine[c]["seq_read_mib_s"] >= TARGET_SEQ_RATIO}
                      for c in engine}
    return {
        "claim": "in a guest, sequential read and write on a popek volume at least 0.9x the "
                 "same QEMU with a plain raw file as its virtio-blk disk (TCG)",
        "target_seq_ratio": TARGET_SEQ_RATIO,
        "ratios_popek_to_plain": ratios,
        "verdict": verdict,
        "target_met": all(all(v.values()) for v in verdict.values()) if verdict else None,
        "ratios_popek_to_same_storage": engine,
        "verdict_same_storage": engine_verdict,
        "same_storage_note": "the issue's ratio compares every case with a plain raw file; "
                             "beside it, each case against the same QEMU opening the same "
                             "kind of storage by hand (a LUKS qcow2 made with popek's "
                             "options; a raw RBD image of the same cluster through the "
                             "same rbd node): what popek itself costs, apart from what "
                             "encryption or Ceph costs",
        "medians": med,
        "summaries": {side: {m: _summary([s[m] for s in samples[side]]) for m in METRICS}
                      for side in sides},
        "samples": samples,
        "cases_not_run": skipped,
        "config": {"runs": args.runs, "size_mib": args.size_mib, "random_ops": args.ops,
                   "memory": MEMORY, "vcpus": 1, "seed": SEED,
                   "sequential": "dd bs=1M over the whole disk, oflag/iflag=direct",
                   "random": "one busybox dd (bs=4096 count=1, direct) per op at awk "
                             "rand() offsets: each op pays a process spawn in the guest, "
                             "on both sides; spawn_ms_per_op is the same loop with count=0",
                   "data": "zeros from /dev/zero (no detect-zeroes on either side)",
                   "host_cache": "QEMU's default on both sides (cache.direct off: the "
                                 "host page cache holds the files)",
                   "popek_format": "qcow2 (dir pool), file descriptors passed by popek",
                   "plain": "popek's argv (qemu.argv.json) without vTPM, a raw file by "
                            "-blockdev file+raw, same serial and root port, serial console"},
        "plain_argv": b.plain_argv,
        "envelope": {"popek_qemu_cpus": b.popek_cpus, "popek_cgroup": b.popek_limits,
                     "plain_alike": b.pin and bool(b.popek_limits),
                     "note": "popek pins its QEMU to as many CPUs as vCPUs (taskset) and "
                             "limits its cgroup (cpu.max, memory.max: guest RAM + overhead, "
                             "which the page cache of the volume's file counts against); "
                             "the plain QEMU gets the same pinning and a cgroup with the "
                             "same two limits unless --unpinned"},
        "host": {"nproc": os.cpu_count(), "kernel": platform.release(),
                 "qemu": subprocess.run(["qemu-system-x86_64", "--version"],
                                        capture_output=True, text=True,
                                        check=False).stdout.splitlines()[0],
                 "accelerator": "tcg" if "accel=tcg" in " ".join(b.plain_argv) else "kvm",
                 "load_start": load_start, "load_end": list(os.getloadavg())},
    }


def plot(report: dict[str, Any], path: Path) -> None:
    """Sequential MiB/s and random IOPS per side, and the ratios with the target line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    med = report["medians"]
    sides = list(med)
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(14, 4.5))
    width = 0.8 / len(sides)
    for k, side in enumerate(sides):
        ax1.bar([i + k * width for i in range(2)],
                [med[side]["seq_write_mib_s"], med[side]["seq_read_mib_s"]], width, label=side)
        ax2.bar([i + k * width for i in range(2)],
                [med[side]["rand_read_iops"], med[side]["rand_write_iops"]], width, label=side)
    ax1.set_xticks([i + width * (len(sides) - 1) / 2 for i in range(2)],
                   ["seq write", "seq read"])
    ax1.set_ylabel("MiB/s in the guest (median)")
    ax1.set_title("sequential, dd bs=1M direct")
    ax1.legend(fontsize=8)
    ax2.set_xticks([i + width * (len(sides) - 1) / 2 for i in range(2)],
                   ["4K rand read", "4K rand write"])
    ax2.set_ylabel("IOPS (one dd per op, median)")
    ax2.set_title("random 4 KiB (process spawn included)")
    ax2.legend(fontsize=8)
    ratios = report["ratios_popek_to_plain"]
    engine = report.get("ratios_popek_to_same_storage", {})
    metrics = ["seq_write_mib_s", "seq_read_mib_s", "rand_read_iops", "rand_write_iops"]
    color = {case: f"C{k}" for k, case in enumerate(sides)}  # as in the other two panels
    bars = [(f"{case} / raw file", ratios[case], "", color[case]) for case in ratios] + \
        [(f"{case} / {engine[case]['baseline']}", engine[case], "//", color[case])
         for case in engine if engine[case]["baseline"] != "plain"]
    cw = 0.8 / max(len(bars), 1)
    for k, (label, vals, hatch, c) in enumerate(bars):
        ax3.bar([i + k * cw for i in range(4)], [vals[m] for m in metrics], cw,
                label=label, hatch=hatch, color=c, edgecolor="black" if hatch else c)
    ax3.axhline(TARGET_SEQ_RATIO, color="red", linestyle="--",
                label=f"target {TARGET_SEQ_RATIO} (sequential)")
    ax3.set_xticks([i + cw * (len(bars) - 1) / 2 for i in range(4)],
                   ["seq w", "seq r", "rand r", "rand w"])
    ax3.set_ylabel("popek / plain (medians)")
    ax3.set_title(f"ratios, {report['config']['runs']} rounds, TCG")
    ax3.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run, write the results, print the summary."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--runs", type=int, default=5, help="measured rounds; default 5")
    ap.add_argument("--size-mib", type=int, default=256,
                    help="disk size in MiB (the sequential region); default 256")
    ap.add_argument("--ops", type=int, default=200, help="random 4 KiB ops per test; "
                    "default 200")
    ap.add_argument("--unpinned", action="store_true",
                    help="run the plain QEMU on every CPU, in no cgroup (by default it is "
                         "pinned to popek's CPUs, in a cgroup with popek's limits)")
    ap.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    args = ap.parse_args(argv)
    if args.runs < 1 or args.size_mib < 16 or args.ops < 1:
        ap.error("--runs and --ops must be at least 1, --size-mib at least 16")
    if os.geteuid() != 0:
        print("storage_io.py: needs root (popek launches VMs)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _on_term)
    signal.signal(signal.SIGHUP, _on_term)
    b = Bench(args.size_mib, pin=not args.unpinned)
    started = dt.datetime.now(dt.UTC)
    try:
        report = run(args, b)
    except BenchError as exc:
        print(f"storage_io.py: {exc}", file=sys.stderr)
        return 1
    finally:
        b.cleanup()
    report["host"]["started"] = started.isoformat(timespec="seconds")
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    text = json.dumps(report, indent=1) + "\n"
    (args.out / f"storage-io-{stamp}.json").write_text(text)
    (args.out / "storage-io-latest.json").write_text(text)
    plot(report, args.out / "storage-io-latest.png")
    print(json.dumps({k: report[k] for k in ("medians", "ratios_popek_to_plain", "verdict",
                                             "cases_not_run")}, indent=1))
    print(f"results: {args.out / f'storage-io-{stamp}.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
