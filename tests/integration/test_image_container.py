"""Container root filesystems for real: the minimal and debian images under runc.

Each image's ``rootfs.tar`` is extracted with a uid shift of 1000000 and run
by runc in a user namespace (container root = host uid 1000000) with busybox
init as ``/sbin/init``: it must print ``popek-guest: ready``, answer an
exec, and stop cleanly (``popek-guest: shutdown``) within 10 s of SIGTERM.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from framework import require_root_and_tools, wait_for
from framework.events import wait_exit, wait_state
from popek.images import Image, ImageStore

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / ".cache" / "popek"
READY = "popek-guest: ready"
SHUTDOWN = "popek-guest: shutdown"
SHIFT = 1_000_000
TOOLS = ("runc", "apt-get", "dpkg-deb", "debootstrap", "unshare")


require_root_and_tools(*TOOLS)


@pytest.fixture(scope="module")
def store() -> Iterator[ImageStore]:
    home = Path(tempfile.mkdtemp(prefix="popek-ct-", dir="/var/tmp"))
    home.chmod(0o711)  # shifted container uids must traverse to their rootfs
    try:
        yield ImageStore(root=home / "images", cache=CACHE)
    finally:
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="module")
def minimal(store: ImageStore) -> Image:
    return store.build("minimal", progress=lambda m: print(f"build: {m}"))


@pytest.fixture(scope="module")
def debian(store: ImageStore) -> Image:
    """The debian image; with the packages cached, built without any network at all."""
    started = time.monotonic()
    from popek.images import debian as debian_builder

    tarball = debian_builder.tarball_path(CACHE, debian_builder.mirror())
    cached = tarball.with_name(tarball.name + ".sha256").is_file()
    code = (
        "import sys; from pathlib import Path; from popek.images import ImageStore; "
        "ImageStore(Path(sys.argv[1]), Path(sys.argv[2])).build('debian', progress=print)"
    )
    argv = [sys.executable, "-c", code, str(store.root), str(CACHE)]
    if cached:
        argv = ["unshare", "--net", *argv]  # a cached build must download nothing
    subprocess.run(argv, check=True, timeout=1800)
    print(
        f"debian build ({'cached, offline' if cached else 'first'}): "
        f"{time.monotonic() - started:.1f} s"
    )
    return store.get("debian")


# -- the tar ------------------------------------------------------------------------


def test_minimal_rootfs_contents(minimal: Image) -> None:
    assert minimal.kinds() == ["vm", "container"]
    minimal.verify()
    with tarfile.open(minimal.file("rootfs")) as tar:
        infos = tar.getmembers()
        by_name = {i.name: i for i in infos}
        names = [i.name for i in infos]

        def text(name: str) -> str:
            f = tar.extractfile(name)
            assert f is not None
            return f.read().decode()

        assert names[0] == "."
        assert names == sorted(names, key=lambda n: n.split("/")) or names[0] == "."
        assert all((i.uid, i.gid, i.uname, i.gname) == (0, 0, "", "") for i in infos)
        assert len({i.mtime for i in infos}) == 1
        # busybox once, its applets (init and sh among them) hardlinks to that one file
        busybox = by_name["bin/busybox"]
        first = busybox.linkname if busybox.islnk() else "bin/busybox"
        assert by_name[first].isreg() and by_name[first].mode == 0o755
        for applet in ("bin/busybox", "sbin/init", "bin/sh", "bin/ls"):
            assert applet == first or (by_name[applet].islnk()
                                       and by_name[applet].linkname == first), applet
        for d, mode in {
            "dev": 0o755,
            "proc": 0o555,
            "sys": 0o555,
            "tmp": 0o1777,
            "run": 0o755,
            "root": 0o700,
        }.items():
            assert by_name[d].isdir() and by_name[d].mode == mode, d
            assert not any(n.startswith(f"{d}/") for n in names), d
        assert not any(i.ischr() or i.isblk() or i.isfifo() for i in infos)
        assert "init" not in by_name and "sbin/popek-agent" not in by_name
        inittab = text("etc/inittab")
        assert "::sysinit:/etc/init.d/rcS-container" in inittab
        assert "::shutdown:/etc/init.d/rcK-container" in inittab
        assert "ttyS0" not in inittab and "popek-agent" not in inittab
        assert by_name["etc/init.d/rcS-container"].mode == 0o755
        assert "mount" not in text("etc/init.d/rcS-container")
        assert "modprobe" not in text("etc/init.d/rcS-container")
        assert text("etc/passwd").splitlines()[0].startswith("root:x:0:0:")
        assert "nobody:x:65534:65534:" in text("etc/passwd")
        assert "nobody:x:65534:" in text("etc/group")
        assert text("etc/hostname") == "popek\n"


def test_debian_rootfs_contents(debian: Image) -> None:
    assert debian.kinds() == ["container"]
    m = debian.manifest
    assert (m.kernel, m.initrd, m.rootfs) == ("", "", "rootfs.tar")
    assert m.version.startswith("12.")
    size = m.files["rootfs.tar"].size
    print(f"debian rootfs.tar: {size / 1e6:.1f} MB")
    with tarfile.open(debian.file("rootfs")) as tar:
        by_name = {i.name: i for i in tar.getmembers()}
    assert by_name["sbin"].issym() and by_name["sbin"].linkname == "usr/sbin"
    assert by_name["usr/sbin/init"].linkname == "/bin/busybox"
    assert by_name["usr/bin/busybox"].isreg()
    assert by_name["usr/bin/passwd"].mode & 0o4000  # setuid kept
    assert by_name["usr/bin/ping"].isreg()  # iputils: ICMP datagram sockets, no CAP_NET_RAW
    assert not any(i.ischr() or i.isblk() for i in by_name.values())
    assert by_name["etc/shadow"].gid == 42  # numeric owners as in the tree
    assert not any(n.startswith("var/cache/apt/archives/") and n.endswith(".deb") for n in by_name)
    assert list((CACHE / "debootstrap").glob("bookworm-amd64-minbase-*.tgz"))


# -- running under runc ------------------------------------------------------------------


def oci_config(hostname_env: str) -> dict[str, object]:
    caps = [
        "CAP_CHOWN",
        "CAP_DAC_OVERRIDE",
        "CAP_FOWNER",
        "CAP_KILL",
        "CAP_SETUID",
        "CAP_SETGID",
        "CAP_NET_ADMIN",
        "CAP_SYS_ADMIN",
        "CAP_NET_BIND_SERVICE",
    ]
    mapping = [{"containerID": 0, "hostID": SHIFT, "size": 65536}]
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            "user": {"uid": 0, "gid": 0},
            "args": ["/sbin/init"],
            "env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin", f"POPEK_HOSTNAME={hostname_env}"],
            "cwd": "/",
            "capabilities": {k: caps for k in ("bounding", "effective", "permitted")},
            "noNewPrivileges": True,
        },
        "root": {"path": "rootfs", "readonly": False},
        "hostname": "initial",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {
                "destination": "/dev",
                "type": "tmpfs",
                "source": "tmpfs",
                "options": ["nosuid", "strictatime", "mode=755", "size=65536k"],
            },
            {
                "destination": "/dev/pts",
                "type": "devpts",
                "source": "devpts",
                "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"],
            },
            {
                "destination": "/dev/shm",
                "type": "tmpfs",
                "source": "shm",
                "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
            },
            {
                "destination": "/sys",
                "type": "sysfs",
                "source": "sysfs",
                "options": ["nosuid", "noexec", "nodev", "ro"],
            },
            {
                "destination": "/tmp",
                "type": "tmpfs",
                "source": "tmpfs",
                "options": ["nosuid", "nodev", "mode=1777"],
            },
            {
                "destination": "/run",
                "type": "tmpfs",
                "source": "tmpfs",
                "options": ["nosuid", "nodev", "mode=755"],
            },
        ],
        "linux": {
            "uidMappings": mapping,
            "gidMappings": mapping,
            "namespaces": [
                {"type": t} for t in ("pid", "mount", "ipc", "uts", "network", "user", "cgroup")
            ],
            "cgroupsPath": f"/popek-test/{hostname_env}",
            "maskedPaths": ["/proc/kcore", "/proc/keys", "/proc/timer_list", "/sys/firmware"],
            "readonlyPaths": [
                "/proc/bus",
                "/proc/fs",
                "/proc/irq",
                "/proc/sys",
                "/proc/sysrq-trigger",
            ],
        },
    }


class Container:
    """One runc container of an image, run from a shifted extraction of its rootfs."""

    def __init__(self, image: Image, workdir: Path, cid: str) -> None:
        self.cid = cid
        self.state_root = workdir / "runc"
        self.bundle = workdir / "bundle"
        self.log = workdir / "console.log"
        self.bundle.mkdir(parents=True)
        self.bundle.chmod(0o711)
        started = time.perf_counter()
        image.extract_rootfs(self.bundle / "rootfs", SHIFT, SHIFT)
        self.extract_seconds = time.perf_counter() - started
        (self.bundle / "config.json").write_text(json.dumps(oci_config(cid)))

    def runc(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["runc", "--root", str(self.state_root), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def run(self) -> None:
        with self.log.open("wb") as log:
            res = subprocess.run(
                [
                    "runc",
                    "--root",
                    str(self.state_root),
                    "run",
                    "-d",
                    "--bundle",
                    str(self.bundle),
                    "--pid-file",
                    str(self.bundle / "pid"),
                    self.cid,
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                timeout=30,
            )
        assert res.returncode == 0, self.log.read_text()

    def lines(self) -> list[str]:
        return self.log.read_text(errors="replace").splitlines()

    def wait_line(self, line: str, timeout: float) -> float:
        """Wait for ``line`` in the log while the init lives (its pidfd: no wait past its end)."""
        started = time.monotonic()
        try:
            wait_state(lambda: line in self.lines(), self.init(), timeout, f"log line {line!r}",
                       interval=0.02)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; log: {self.lines()}") from None
        return time.monotonic() - started

    def init(self) -> int:
        """The host pid of the container's init (runc run -d wrote it before returning)."""
        return int((self.bundle / "pid").read_text())

    def status(self) -> str:
        res = self.runc("state", self.cid)
        return str(json.loads(res.stdout)["status"]) if res.returncode == 0 else "gone"

    def cleanup(self) -> None:
        self.runc("delete", "--force", self.cid)
        for controller in Path("/sys/fs/cgroup").iterdir():
            for d in (controller / "popek-test" / self.cid, controller / "popek-test"):
                with contextlib.suppress(OSError):
                    d.rmdir()


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="popek-runc-", dir="/var/tmp"))
    path.chmod(0o711)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.mark.parametrize("image_name", ["minimal", "debian"])
def test_runc_boot_exec_and_clean_stop(
    request: pytest.FixtureRequest, workdir: Path, image_name: str
) -> None:
    image: Image = request.getfixturevalue(image_name)
    cid = f"popek-{image_name}-{os.getpid()}"
    ct = Container(image, workdir, cid)
    print(f"{image_name}: extract_rootfs {ct.extract_seconds * 1000:.0f} ms")
    rootfs = ct.bundle / "rootfs"
    assert (rootfs.stat().st_uid, rootfs.stat().st_gid) == (SHIFT, SHIFT)
    assert os.lstat(rootfs / "sbin/init").st_uid == SHIFT
    try:
        started = time.monotonic()
        ct.run()
        ready = ct.wait_line(READY, timeout=20)
        print(f"{image_name}: runc run -> '{READY}' {time.monotonic() - started:.2f} s")
        assert ready < 20
        res = ct.runc("exec", cid, "cat", "/etc/hostname")
        assert (res.returncode, res.stdout) == (0, f"{cid}\n"), res.stderr
        res = ct.runc("exec", cid, "busybox", "hostname")
        assert res.stdout == f"{cid}\n"
        res = ct.runc("exec", cid, "busybox", "id", "-u")
        assert res.stdout == "0\n"  # root inside, uid 1000000 outside
        host_pid = int((ct.bundle / "pid").read_text())
        assert Path(f"/proc/{host_pid}").stat().st_uid == SHIFT
        res = ct.runc("exec", cid, "busybox", "ip", "link", "show", "lo")
        assert "UP" in res.stdout
        assert ct.status() == "running"

        killed = time.monotonic()
        assert ct.runc("kill", cid, "TERM").returncode == 0
        wait_exit(host_pid, 10, f"the init to end on SIGTERM: {ct.lines()}")
        stopped = time.monotonic() - killed
        wait_for(lambda: ct.status() != "running", 10, "runc to see the init gone")
        print(f"{image_name}: SIGTERM -> stopped {stopped:.2f} s")
        assert ct.status() == "stopped", f"still running 10 s after SIGTERM: {ct.lines()}"
        print(f"{image_name}: log {ct.lines()}")
        assert SHUTDOWN in ct.lines()
        assert ct.lines().count(READY) == 1
        assert ct.runc("delete", cid).returncode == 0
        assert ct.status() == "gone"
    finally:
        ct.cleanup()
