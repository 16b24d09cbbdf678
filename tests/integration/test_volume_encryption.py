"""Encrypted volumes in a real VM (issue 15.5).

``popek storage volume create ... --encrypt`` makes a LUKS qcow2 under the
project's key; a VM launched with it (``--disk``) writes a known string, which
is then not in any file of the volume, while the same string written to a
plain volume by the same guest is in its file (the check can fail).  What the
guest wrote survives a stop and a start and comes back with a snapshot
restore; the key is in no QEMU or qemu-img command line and in no file of the
home, the jail or ``/run``; a launch whose key is missing is refused clearly.
One VM boot at a time under TCG.
"""

from __future__ import annotations

import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from framework import popek, popek_json, require_root_and_tools
from popek.errors import NOT_FOUND
from popek.trust.secrets import Secrets

require_root_and_tools()

VM = "hcry-vm"
SEC, PLAIN = "hcry-sec", "hcry-plain"
MARK = "popek-crypt-MARK-5f1c2a"
MiB = 1 << 20


def guest(script: str) -> str:
    return popek("exec", VM, "--", "sh", "-c", script, timeout=120).stdout


def write_mark(dev: str, text: str, sector: int = 8) -> None:
    # many copies, so that one is whole in some cluster whatever the layout
    guest(f"for i in $(seq 64); do printf {text}; done | "
          f"dd of={dev} bs=512 seek={sector} conv=notrunc,fsync 2>/dev/null; sync")


def read_mark(dev: str, sector: int = 8) -> str:
    return guest(f"dd if={dev} bs=512 skip={sector} count=1 2>/dev/null | head -c {len(MARK)}")


def files_of(home: Path, name: str) -> list[Path]:
    return sorted((home / "storage" / "local" / "default").glob(f"{name}*.qcow2"))


@pytest.fixture(scope="module")
def volumes(popek_home: Path, minimal_image: str) -> Iterator[Path]:
    out = popek("storage", "volume", "create", "local", SEC, "--size", "64MiB",
                "--encrypt").stdout
    assert "encrypted" in out
    popek("storage", "volume", "create", "local", PLAIN, "--size", "64MiB")
    yield popek_home
    popek("delete", "--force", VM, check=False)
    for vol in (SEC, PLAIN):
        popek("storage", "volume", "delete", "local", vol, check=False)


def test_the_guest_s_data_is_not_in_the_encrypted_file(volumes: Path,
                                                       minimal_image: str) -> None:
    home = volumes
    info = popek_json("storage", "volume", "info", "local", SEC)
    assert info["encrypted"] is True
    assert popek_json("storage", "volume", "info", "local", PLAIN)["encrypted"] is False
    listed = popek("storage", "volume", "list", "local", "-c", "ne", "-f", "csv").stdout
    assert f"{SEC},yes" in listed.splitlines() and f"{PLAIN},no" in listed.splitlines()
    key = Secrets(home).volume_key("default")
    seen: list[bytes] = []  # every qemu-img command line while popek runs
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            for pid in os.listdir("/proc"):
                if pid.isdigit():
                    try:
                        line = Path(f"/proc/{pid}/cmdline").read_bytes()
                    except OSError:
                        continue
                    if b"qemu" in line:
                        seen.append(line)
            done.wait(0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        popek("launch", minimal_image, VM, "--memory", "256MiB", "--disk", f"local/{SEC}",
              "--disk", f"local/{PLAIN}")
        write_mark("/dev/vda", MARK)
        write_mark("/dev/vdb", MARK)
        assert read_mark("/dev/vda") == MARK
        pid = int(popek_json("info", VM)["pid"])
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        assert b"qemu-system" in cmdline and b"vol0-key" in cmdline
        assert key.encode() not in cmdline and bytes.fromhex(key) not in cmdline
        workdir = Path(popek_json("info", VM)["workdir"])
        assert not list(workdir.glob("disk*.key"))  # the FIFO is gone once QEMU read it
        popek("stop", VM)
    finally:
        done.set()
        watcher.join()
    assert seen and not any(key.encode() in line for line in seen)
    # the same guest wrote the same string: in the plain file, in no file of the encrypted
    plain = b"".join(f.read_bytes() for f in files_of(home, PLAIN))
    assert MARK.encode() in plain
    sec = files_of(home, SEC)
    assert sec and not any(MARK.encode() in f.read_bytes() for f in sec)
    # the key is in no file of the home, of /run/popek, nor of the instance directory
    for root in (home, Path("/run/popek")):
        for dirpath, _dirs, names in os.walk(root):
            for n in names:
                f = Path(dirpath) / n
                if not f.is_file() or f.is_symlink():
                    continue
                try:
                    data = f.read_bytes()
                except OSError:
                    continue
                assert key.encode() not in data and bytes.fromhex(key) not in data, f


def test_data_survives_a_restart_and_a_snapshot_restore(volumes: Path,
                                                        minimal_image: str) -> None:
    popek("storage", "volume", "detach", f"local/{PLAIN}", VM)  # the encrypted one: vda
    popek("start", VM)
    assert read_mark("/dev/vda") == MARK
    # snapshot and restore while the VM runs, the volume unplugged and plugged back live
    # (one boot where a stop and a start around each took three)
    popek("storage", "volume", "detach", f"local/{SEC}", VM)
    popek("storage", "volume", "snapshot", "local", SEC, "s1")
    popek("storage", "volume", "attach", f"local/{SEC}", VM)
    write_mark("/dev/vda", "popek-crypt-LATER-77777")
    assert read_mark("/dev/vda") == "popek-crypt-LATER-77777"[:len(MARK)]
    popek("storage", "volume", "detach", f"local/{SEC}", VM)
    popek("storage", "volume", "restore", "local", SEC, "s1")
    popek("storage", "volume", "attach", f"local/{SEC}", VM)
    assert read_mark("/dev/vda") == MARK
    popek("stop", VM)
    files = files_of(volumes, SEC)
    assert len(files) == 2 and not any(b"popek-crypt" in f.read_bytes() for f in files)
    for f in files:  # every layer is LUKS
        out = subprocess.run(["qemu-img", "info", "-U", str(f)], capture_output=True,
                             text=True, check=True).stdout
        assert "encrypted: yes" in out


def test_a_missing_key_refuses_the_start_clearly(volumes: Path, minimal_image: str) -> None:
    keyfile = Secrets(volumes).key_path("default")
    kept = keyfile.with_name("kept")
    os.rename(keyfile, kept)
    try:
        proc = popek("start", VM, check=False)
        assert proc.returncode == NOT_FOUND, proc.stderr
        assert "project 'default' has no volume key" in proc.stderr
        assert "Traceback" not in proc.stderr
        assert popek_json("info", VM)["state"] == "stopped"
    finally:
        os.rename(kept, keyfile)
    popek("start", VM)
    assert read_mark("/dev/vda") == MARK
    popek("delete", "--force", VM)


def test_hot_plug_of_an_encrypted_volume(volumes: Path, minimal_image: str) -> None:
    """Plugged into the running VM, QEMU gets the key over its monitor (``object-add``),
    never its command line; the guest reads what it wrote before; it grows live; unplugged
    and plugged again into the same slot (its secret went with the disk)."""
    key = Secrets(volumes).volume_key("default")
    popek("launch", minimal_image, VM, "--memory", "256MiB")
    try:
        popek("storage", "volume", "attach", f"local/{SEC}", VM)
        assert read_mark("/dev/vda") == MARK
        pid = int(popek_json("info", VM)["pid"])
        assert key.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()
        popek("storage", "volume", "resize", "local", SEC, "96MiB")
        assert guest("cat /sys/block/vda/size") == f"{96 * MiB // 512}\n"
        popek("storage", "volume", "detach", f"local/{SEC}", VM)
        assert guest("ls /sys/block | grep -c vd || true") == "0\n"
        popek("storage", "volume", "attach", f"local/{SEC}", VM)
        assert read_mark("/dev/vda") == MARK
    finally:
        popek("delete", "--force", VM, check=False)
