"""A real single-host Ceph cluster for tests and benchmarks: 1 mon, 1 mgr, 3 OSDs.

Made from Debian's packages (``ceph-mon``, ``ceph-mgr``, ``ceph-osd``), without
cephadm, LVM or device-mapper: each OSD is BlueStore on a plain sparse file of
10 GiB.  Everything (config, keys, daemons' data, sockets, logs) lives under one
temporary directory; every daemon listens on 127.0.0.1 only and runs in the
foreground as a child of the caller, in a process group of its own, so
:meth:`CephCluster.stop` (also registered with ``atexit``) leaves no daemon
behind.  The failure-domain is the OSD (``osd crush chooseleaf type = 0``,
written before the mon is made), and one report marks an OSD down
(``mon osd min down reporters = 1``, ``mon osd reporter subtree level = osd``),
so a killed OSD is seen down in about a second.  HEALTH_OK in about 25 s here.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

#: the Debian packages the cluster needs (scripts/setup.sh installs them)
PACKAGES = ("ceph-mon", "ceph-osd", "ceph-mgr")
OSDS = 3
OSD_SIZE = 10 << 30
#: the RBD pool every test cluster has
RBD_POOL = "rbd"
#: the client the tests give popek: only what RBD needs, in that pool
CLIENT = "popek"
HEALTH_TIMEOUT_S = 120.0


def missing() -> str:
    """Why no cluster can be made here ('' when it can): a missing binary or binding."""
    for tool in ("ceph-mon", "ceph-osd", "ceph-mgr", "ceph", "ceph-authtool", "monmaptool"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (Debian's {' '.join(PACKAGES)}: make setup)"
    try:
        import rados  # noqa: F401
        import rbd  # noqa: F401
    except ImportError as exc:
        return f"the rados/rbd Python bindings do not import ({exc}): make setup links them"
    return ""


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the process that started it dies (a test
    run killed outright leaves no daemon either)."""
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class CephCluster:
    """One cluster under ``root`` (a new temporary directory when not given)."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = root or Path(tempfile.mkdtemp(prefix="popek-ceph-", dir="/var/tmp"))
        self.conf = self.root / "ceph.conf"
        self.admin_keyring = self.root / "admin.keyring"
        #: the keyring of client.popek (RBD in pool ``rbd`` only)
        self.keyring = self.root / f"client.{CLIENT}.keyring"
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.fsid = str(uuid.uuid4())
        self.osd_uuids: dict[int, str] = {}

    # -- commands ---------------------------------------------------------------
    def ceph(self, *args: str, timeout: float = 60.0) -> str:
        """Run ``ceph ARGS`` as client.admin; its standard output (CalledProcessError)."""
        done = subprocess.run(["ceph", "-c", str(self.conf), "-k", str(self.admin_keyring),
                               "--connect-timeout", "20", *args], capture_output=True,
                              text=True, timeout=timeout, check=False)
        if done.returncode != 0:
            raise subprocess.CalledProcessError(done.returncode, ["ceph", *args], done.stdout,
                                                done.stderr)
        return done.stdout

    def _tool(self, *argv: str) -> None:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv[:2])} failed: {done.stderr.strip()[-2000:]}")

    def _daemon(self, name: str, argv: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.out", "ab")  # noqa: SIM115
        self.procs[name] = subprocess.Popen(
            [*argv, "-f", "-c", str(self.conf)], stdin=subprocess.DEVNULL, stdout=log,
            stderr=log, start_new_session=True, preexec_fn=_die_with_parent)
        log.close()

    # -- life ------------------------------------------------------------------------
    def start(self) -> CephCluster:
        """Make the cluster and wait for HEALTH_OK with pool ``rbd`` and client.popek."""
        atexit.register(self.stop)
        for d in ("run", "log", "mon", "mgr", "osd"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        v2, v1 = _free_port(), _free_port()
        mon_addr = f"[v2:127.0.0.1:{v2},v1:127.0.0.1:{v1}]"
        r = self.root
        self.conf.write_text(f"""[global]
fsid = {self.fsid}
mon initial members = a
mon host = {mon_addr}
public network = 127.0.0.0/8
public addr = 127.0.0.1
cluster addr = 127.0.0.1
ms bind ipv4 = true
ms bind ipv6 = false
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
auth allow insecure global id reclaim = false
run dir = {r}/run
admin socket = {r}/run/$cluster-$name.asok
log file = {r}/log/$cluster-$name.log
crash dir = {r}/crash
exporter sock dir = {r}/run
mon data = {r}/mon/$cluster-$id
mgr data = {r}/mgr/$cluster-$id
osd data = {r}/osd/$cluster-$id
keyring = {r}/$name.keyring
osd crush chooseleaf type = 0
osd pool default size = 3
osd pool default min size = 2
osd pool default pg num = 32
osd pool default pgp num = 32
osd pool default pg autoscale mode = off
mon osd min down reporters = 1
mon osd reporter subtree level = osd
mon allow pool delete = true
mon data avail warn = 2
mon data avail crit = 1
mon warn on pool no redundancy = false
osd objectstore = bluestore
bluestore block create = true
bluestore block size = {OSD_SIZE}
osd memory target = 939524096
bluestore cache autotune = false
bluestore cache size = 134217728
osd heartbeat grace = 6
osd heartbeat interval = 1
""")
        mon_kr, admin = r / "mon.keyring", self.admin_keyring
        self._tool("ceph-authtool", "--create-keyring", str(mon_kr), "--gen-key", "-n", "mon.",
                   "--cap", "mon", "allow *")
        self._tool("ceph-authtool", "--create-keyring", str(admin), "--gen-key", "-n",
                   "client.admin", "--cap", "mon", "allow *", "--cap", "osd", "allow *",
                   "--cap", "mgr", "allow *", "--cap", "mds", "allow *")
        self._tool("ceph-authtool", str(mon_kr), "--import-keyring", str(admin))
        monmap = r / "monmap"
        self._tool("monmaptool", "--create", "--addv", "a", mon_addr, "--fsid", self.fsid,
                   str(monmap))
        self._tool("ceph-mon", "-c", str(self.conf), "--mkfs", "-i", "a", "--monmap",
                   str(monmap), "--keyring", str(mon_kr))
        self._daemon("mon.a", ["ceph-mon", "-i", "a"])
        (r / "mgr" / "ceph-x").mkdir(exist_ok=True)
        self.ceph("auth", "get-or-create", "mgr.x", "mon", "allow profile mgr", "osd",
                  "allow *", "mds", "allow *", "-o", str(r / "mgr.x.keyring"))
        self._daemon("mgr.x", ["ceph-mgr", "-i", "x"])
        for _ in range(OSDS):
            self._make_osd()
        self.ceph("osd", "pool", "create", RBD_POOL, "32", "32")
        self.ceph("osd", "pool", "application", "enable", RBD_POOL, "rbd")
        self.ceph("auth", "get-or-create", f"client.{CLIENT}", "mon", "profile rbd", "osd",
                  f"profile rbd pool={RBD_POOL}", "mgr", f"profile rbd pool={RBD_POOL}",
                  "-o", str(self.keyring))
        self.wait_healthy()
        return self

    def _make_osd(self) -> None:
        osd_uuid = str(uuid.uuid4())
        osd_id = int(self.ceph("osd", "new", osd_uuid).strip())
        self.osd_uuids[osd_id] = osd_uuid
        data = self.root / "osd" / f"ceph-{osd_id}"
        data.mkdir()
        kr = self.root / f"osd.{osd_id}.keyring"
        self._tool("ceph-osd", "-c", str(self.conf), "-i", str(osd_id), "--mkfs", "--mkkey",
                   "--no-mon-config", "--osd-uuid", osd_uuid)
        self.ceph("auth", "add", f"osd.{osd_id}", "osd", "allow *", "mon", "allow profile osd",
                  "mgr", "allow profile osd", "-i", str(kr))
        self.start_osd(osd_id)

    def start_osd(self, osd_id: int) -> None:
        """Start OSD ``osd_id`` (again, after :meth:`kill_osd`)."""
        self._daemon(f"osd.{osd_id}", ["ceph-osd", "-i", str(osd_id)])

    def kill_osd(self, osd_id: int) -> None:
        """SIGKILL OSD ``osd_id`` (a crash, not a clean stop)."""
        p = self.procs.pop(f"osd.{osd_id}")
        p.kill()
        p.wait()

    def health(self) -> str:
        """HEALTH_OK, HEALTH_WARN or HEALTH_ERR, as the mon says."""
        return str(json.loads(self.ceph("health", "--format", "json"))["status"])

    def osds_up(self) -> int:
        """How many OSDs the map has up."""
        return int(json.loads(self.ceph("osd", "stat", "--format", "json"))["num_up_osds"])

    def pgs_clean(self) -> bool:
        """Whether every placement group is active+clean."""
        stat = json.loads(self.ceph("pg", "stat", "--format", "json"))
        summary = stat.get("pg_summary", stat)
        clean = sum(int(s["num"]) for s in summary.get("num_pg_by_state", [])
                    if s["name"] == "active+clean")
        return clean == int(summary.get("num_pgs", -1))

    def wait_healthy(self, timeout: float = HEALTH_TIMEOUT_S) -> float:
        """Wait until HEALTH_OK with every OSD up and every PG active+clean; the seconds it
        took (RuntimeError with the last health detail when it did not come)."""
        t0 = time.monotonic()
        detail = ""
        while time.monotonic() - t0 < timeout:
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise RuntimeError(f"ceph {name} exited with {p.returncode}: see "
                                       f"{self.root / 'log'}")
            try:
                if (self.health() == "HEALTH_OK" and self.osds_up() == OSDS
                        and self.pgs_clean()):
                    return time.monotonic() - t0
                detail = self.ceph("health", "detail")
            except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
                detail = str(getattr(exc, "stderr", "") or exc)
            time.sleep(0.5)  # polling a cluster's state, not synchronising with a test
        raise RuntimeError(f"the Ceph cluster is not healthy after {timeout:g} s: {detail}")

    def stop(self) -> None:
        """Kill every daemon (SIGKILL, each process group) and remove the directory."""
        for p in self.procs.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=30)
        self.procs.clear()
        shutil.rmtree(self.root, ignore_errors=True)
