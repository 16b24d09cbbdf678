"""Stealing an encrypted volume's key on its way to QEMU (issue 15.5).

At a start popek puts the key in a FIFO of the instance directory (0700, the
instance's uid) for QEMU to read.  Here another unprivileged uid (another
instance's QEMU) tries to open the FIFO and the wrapped key file: refused
by the kernel (EACCES); the instance's own uid opens the FIFO and gets the key
(the attack is real: only the permissions stop it), and the secret store's
files are root's alone.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from framework import require_root_and_tools
from popek.engines.qemu.keyfifo import KeyFifo
from popek.trust.secrets import Secrets

require_root_and_tools()

OWNER, THIEF = 61001, 61002  # an instance's uid, another instance's
KEY = "5e" * 32
READ = ("import os, sys\n"
        "try:\n"
        "    fd = os.open(sys.argv[1], os.O_RDONLY)\n"
        "    print(os.read(fd, 100).hex())\n"
        "except OSError as exc:\n"
        "    print(exc.strerror)\n")


def read_as(uid: int, path: Path) -> str:
    # the system's python: the test's own lives where another uid cannot run it
    return subprocess.run(["/usr/bin/python3", "-c", READ, str(path)], user=uid, group=uid,
                          extra_groups=[], capture_output=True, text=True, timeout=30,
                          check=True).stdout.strip()


@pytest.fixture
def place() -> Iterator[Path]:
    """A directory other uids can cross (pytest's own is root's alone)."""
    d = Path(tempfile.mkdtemp(prefix="popek-keytheft-", dir="/var/tmp"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_another_uid_cannot_take_the_key_from_the_fifo(place: Path) -> None:
    tmp_path = place
    workdir = tmp_path / "instance"
    workdir.mkdir(mode=0o700)
    os.chown(workdir, OWNER, OWNER)
    fifo = KeyFifo(workdir / "disk0.key", KEY, OWNER, OWNER)
    try:
        assert read_as(THIEF, workdir / "disk0.key") == "Permission denied"
        workdir.chmod(0o711)  # even where the directory can be crossed: the FIFO is 0600
        assert read_as(THIEF, workdir / "disk0.key") == "Permission denied"
        assert not fifo.read
        assert read_as(OWNER, workdir / "disk0.key") == KEY.encode().hex()  # its QEMU's
    finally:
        fifo.close()
    assert fifo.read


def test_the_secret_store_is_root_s_alone(place: Path) -> None:
    home = place / "home"
    home.mkdir(mode=0o755)
    secrets = Secrets(home)
    secrets.volume_key("default", create=True)
    for f in (secrets.dir / "host.key", secrets.key_path("default")):
        assert read_as(THIEF, f) == "Permission denied"
    (secrets.dir / "volumes").chmod(0o755)  # a directory opened by mistake: files stay 0600
    assert read_as(THIEF, secrets.key_path("default")) == "Permission denied"
    secrets.dir.chmod(0o755)
    secrets.key_path("default").chmod(0o644)  # control: the same read once it is allowed
    assert len(bytes.fromhex(read_as(THIEF, secrets.key_path("default")))) == 61
