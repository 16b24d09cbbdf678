"""Build the "minimal" image for real and boot it under QEMU (TCG) to prove the guest contract.

Needs root, apt (with package lists), dpkg-deb, kmod and qemu-system-x86_64.
Downloads go to ``<repo>/.cache/popek`` and are reused between runs.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import os
import secrets
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from framework import require_root_and_tools
from framework.events import wait_state
from popek.images import Image, ImageStore

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / ".cache" / "popek"
QEMU = "qemu-system-x86_64"
READY = "popek-guest: ready"
SHUTDOWN = "popek-guest: shutdown"
TOOLS = (QEMU, "apt-get", "dpkg-deb", "depmod", "modprobe")


require_root_and_tools(*TOOLS)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ImageStore]:
    home = tmp_path_factory.mktemp("popek-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("POPEK_HOME", str(home))
        mp.setenv("POPEK_CACHE", str(CACHE))
        yield ImageStore()


@pytest.fixture(scope="module")
def image(store: ImageStore) -> Image:
    started = time.monotonic()
    img = store.build("minimal", progress=lambda m: print(f"build: {m}"))
    print(f"build of 'minimal' took {time.monotonic() - started:.1f} s")
    return img


# -- the built files ---------------------------------------------------------------


def read_newc(path: Path) -> dict[str, tuple[int, int, int, bytes]]:
    """Return name -> (mode, uid, gid, data) of a gzip-compressed newc cpio archive."""
    blob = gzip.decompress(path.read_bytes())
    entries: dict[str, tuple[int, int, int, bytes]] = {}
    pos = 0
    while True:
        assert blob[pos : pos + 6] == b"070701", f"bad cpio magic at {pos}"
        fields = [int(blob[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        mode, uid, gid, size, namesize = fields[1], fields[2], fields[3], fields[6], fields[11]
        name = blob[pos + 110 : pos + 110 + namesize - 1].decode()
        pos = (pos + 110 + namesize + 3) & ~3
        data = blob[pos : pos + size]
        pos = (pos + size + 3) & ~3
        if name == "TRAILER!!!":
            return entries
        entries[name] = (mode, uid, gid, data)


def test_manifest_and_files(image: Image, store: ImageStore) -> None:
    m = image.manifest
    assert image.path == store.root / "minimal"
    assert (m.name, m.kernel, m.initrd, m.arch) == ("minimal", "vmlinuz", "initrd.img", "x86_64")
    assert m.cmdline == "console=ttyS0 panic=-1 quiet"
    assert m.kernel_version.endswith("-cloud-amd64")
    assert m.rootfs == "rootfs.tar" and image.kinds() == ["vm", "container"]
    assert set(m.files) == {"vmlinuz", "initrd.img", "rootfs.tar"}
    listing = sorted(p.name for p in image.path.iterdir())
    assert listing == ["initrd.img", "manifest.json", "rootfs.tar", "vmlinuz"]
    for fname, want in m.files.items():
        data = (image.path / fname).read_bytes()
        assert (hashlib.sha256(data).hexdigest(), len(data)) == (want.sha256, want.size)
        assert (image.path / fname).stat().st_mode & 0o777 == 0o644
    assert image.path.stat().st_mode & 0o777 == 0o755
    image.verify()
    assert [i.name for i in store.list()] == ["minimal"]


def test_initrd_contents(image: Image) -> None:
    entries = read_newc(image.file("initrd"))
    kver = image.manifest.kernel_version
    moddir = f"lib/modules/{kver}"
    assert all(uid == 0 and gid == 0 for _, uid, gid, _ in entries.values())
    assert entries["init"][3] == b"/bin/busybox"
    assert entries["bin/busybox"][0] & 0o777 == 0o755
    assert entries["sbin/modprobe"][3] == b"/bin/busybox"
    assert b"org.popek.agent.0" in entries["sbin/popek-agent"][3]
    assert b"::shutdown:" in entries["etc/inittab"][3]
    assert "etc/acpi/PWRF/00000080" in entries
    assert f"{moddir}/kernel/drivers/char/virtio_console.ko" in entries
    assert entries[f"{moddir}/kernel/drivers/char/virtio_console.ko"][3][:4] == b"\x7fELF"
    dep = entries[f"{moddir}/modules.dep"][3].decode()
    assert "kernel/drivers/char/virtio_console.ko:" in dep
    assert "kernel/drivers/virtio/virtio_pci.ko:" in dep


def test_rebuild_uses_cache(
    image: Image, store: ImageStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    debs = sorted((CACHE / "debs").glob("*.deb"))
    assert len(debs) >= 3
    before = {p: p.stat().st_mtime_ns for p in debs}
    downloads: list[list[str]] = []
    real_run = subprocess.run

    def counting_run(args: list[str], **kw: object) -> object:
        if "download" in args and "--print-uris" not in args:
            downloads.append(list(args))
        return real_run(args, **kw)  # type: ignore[call-overload]

    monkeypatch.setattr(subprocess, "run", counting_run)
    rebuilt = store.build("minimal", force=True)
    assert downloads == []
    assert {p: p.stat().st_mtime_ns for p in debs} == before
    # the build is deterministic: same packages, same bytes
    assert rebuilt.manifest.files == image.manifest.files
    rebuilt.verify()


# -- booting ------------------------------------------------------------------------


class Guest:
    """One QEMU (TCG) run of an image, with console log, agent and QMP sockets."""

    def __init__(self, image: Image, workdir: Path, append: str = "") -> None:
        self.dir = workdir
        self.console = workdir / "console.log"
        cmdline = f"{image.manifest.cmdline} {append}".strip()
        d = workdir
        self.argv = [
            QEMU, "-machine", "q35,accel=tcg", "-nodefaults", "-no-user-config",
            "-m", "256", "-smp", "2",
            "-kernel", str(image.file("kernel")), "-initrd", str(image.file("initrd")),
            "-append", cmdline,
            "-chardev",
            f"socket,id=con,path={d}/console.sock,server=on,wait=off,logfile={self.console}",
            "-serial", "chardev:con",
            "-device", "virtio-serial-pci,id=vser0",
            "-chardev", f"socket,id=agent,path={d}/agent.sock,server=on,wait=off",
            "-device", "virtserialport,bus=vser0.0,chardev=agent,name=org.popek.agent.0",
            "-qmp", f"unix:{d}/qmp.sock,server=on,wait=off",
            "-display", "none",
        ]  # fmt: skip
        self.started = time.monotonic()
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def console_lines(self) -> list[str]:
        text = self.console.read_bytes().decode(errors="replace") if self.console.exists() else ""
        return [line.strip("\r") for line in text.split("\n")]

    def wait_line(self, line: str, timeout: float) -> float:
        """Wait until ``line`` is a whole console line; return seconds since QEMU start."""
        try:  # a QEMU that exits fails at once (its pidfd), not at the deadline
            wait_state(lambda: line in self.console_lines(), self.proc.pid, timeout,
                       f"console line {line!r}", interval=0.05)
        except AssertionError as exc:
            qemu = self.proc.stdout.read() if self.proc.poll() is not None else b""  # type: ignore[union-attr]
            raise AssertionError(f"{exc}; QEMU said {qemu!r}; console: {self.console_lines()}"
                                 ) from None
        return time.monotonic() - self.started

    def connect(self, name: str) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(self.dir / name))
        return s

    def qmp(self, *commands: str) -> None:
        with self.connect("qmp.sock") as s, s.makefile("rwb") as f:
            assert b"QMP" in f.readline()
            for cmd in commands:
                f.write(json.dumps({"execute": cmd}).encode() + b"\n")
                f.flush()
                while True:
                    reply = json.loads(f.readline())
                    if "event" not in reply:
                        break
                assert "return" in reply, reply

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def _b64(text: str) -> bytes:
    return b"" if text == "-" else base64.b64decode(text, validate=True)


class Agent:
    """A client of the guest agent's line protocol."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.file = sock.makefile("rwb")
        self.sync()

    def send(self, line: str) -> None:
        self.file.write(line.encode() + b"\n")
        self.file.flush()

    def recv(self) -> str:
        line = self.file.readline()
        assert line.endswith(b"\n"), f"agent closed the channel: {line!r}"
        return line.decode().rstrip("\n")

    def sync(self) -> None:
        """PING with a fresh id and skip stale lines until the matching PONG."""
        nonce = secrets.token_hex(4)
        self.send(f"PING {nonce}")
        while self.recv() != f"PONG {nonce}":
            pass

    def exec(self, command: str, stdin: bytes = b"") -> tuple[int, bytes, bytes]:
        rid = secrets.token_hex(4)
        b64 = base64.b64encode(command.encode()).decode()
        self.send(f"EXEC {rid} {b64} {base64.b64encode(stdin).decode() if stdin else '-'}")
        out, err = b"", b""
        while True:  # OUT and ERR chunks as the output comes, then EXIT
            verb, got_id, arg = self.recv().split(" ")
            assert got_id == rid
            if verb == "EXIT":
                return int(arg), out, err
            assert verb in ("OUT", "ERR"), verb
            assert len(arg) <= 4 * (48 << 10) // 3  # chunks of 48 KiB at most
            if verb == "OUT":
                out += _b64(arg)
            else:
                err += _b64(arg)

    def close(self) -> None:
        self.file.close()
        self.sock.close()


@pytest.fixture
def guest(image: Image, tmp_path: Path) -> Iterator[Guest]:
    g = Guest(image, tmp_path, append="popek.hostname=testvm")
    try:
        yield g
    finally:
        g.kill()


def test_boot_agent_and_clean_poweroff(
    guest: Guest, record_property: Callable[[str, object], None]
) -> None:
    ready = guest.wait_line(READY, timeout=120)
    print(f"QEMU start -> '{READY}': {ready:.2f} s")
    record_property("ready_seconds", round(ready, 2))

    agent = Agent(guest.connect("agent.sock"))
    assert agent.exec("nproc") == (0, b"2\n", b"")
    rc, out, err = agent.exec("cat /proc/meminfo")
    assert rc == 0 and out.startswith(b"MemTotal:") and err == b""
    assert agent.exec("echo oops >&2; echo out; exit 3") == (3, b"out\n", b"oops\n")
    payload = os.urandom(20000)
    rc, out, _ = agent.exec("sha256sum", stdin=payload)
    assert (rc, out.split()[0].decode()) == (0, hashlib.sha256(payload).hexdigest())
    assert agent.exec("cat", stdin=b"\x00\x01\xff\n") == (0, b"\x00\x01\xff\n", b"")
    rc, out, _ = agent.exec("head -c 3145728 /dev/urandom")
    assert rc == 0 and len(out) == 3 * 1024 * 1024
    assert agent.exec("hostname") == (0, b"testvm\n", b"")
    rc, out, _ = agent.exec("cat /sys/class/input/*/name; ls /dev/input")
    assert b"Power Button" in out and b"event" in out
    agent.send("FROB x1")
    assert agent.recv() == "ERROR x1 unknown-verb"
    agent.send("EXEC x2 !!!notbase64 -")
    assert agent.recv() == "ERROR x2 bad-request"
    agent.send("PING bad/id")
    assert agent.recv() == "ERROR - bad-id"
    agent.close()

    # a client that leaves mid-line, then one that leaves mid-request
    with guest.connect("agent.sock") as s:
        s.sendall(b"EXEC half ZWNobyBoaQ")
    # Not an assertion's synchronisation: the guest sees the hang-up in its own time and
    # no host-side event tells when; this gives it the time to take the usual path (the
    # partial line dropped).  Should it not have, the next client's leading newline ends
    # the half line instead, and every check below holds either way.
    time.sleep(0.5)
    with guest.connect("agent.sock") as s:
        # the command writes a console line once it runs: the client leaves mid-request
        command = b"echo gone-started >/dev/console; sleep 1; echo late"
        s.sendall(b"\nEXEC gone " + base64.b64encode(command) + b" -\n")
        wait_state(lambda: any("gone-started" in line for line in guest.console_lines()),
                   guest.proc.pid, 60, "the request to run", interval=0.05)  # after a prompt
    agent = Agent(guest.connect("agent.sock"))  # the agent ended "gone" when its client left
    assert agent.exec("echo still here") == (0, b"still here\n", b"")
    agent.close()

    guest.qmp("qmp_capabilities", "system_powerdown")
    guest.proc.wait(timeout=30)
    lines = guest.console_lines()
    assert SHUTDOWN in lines
    assert not any("base64" in line for line in lines)
    assert any("reboot: Power down" in line for line in lines)
