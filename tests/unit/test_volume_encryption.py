"""Encryption at rest of ``dir`` volumes and the secret store (issue 15.5).

Real files: the secret store under the test's POPEK_HOME, real ``qemu-img``
and ``qemu-io`` on LUKS qcow2 files, a real SQLite store.  Every ``qemu-img``
popek runs is recorded (the real one runs) to check that no key reaches an
argv.  No root.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from popek import proc
from popek.engines.qemu import cmdline
from popek.engines.qemu.keyfifo import KeyFifo
from popek.errors import EngineError, InvalidInput, NotFound
from popek.state.store import SQLiteStore
from popek.storage import dirpool
from popek.storage.service import Storage
from popek.trust.secrets import SecretError, Secrets

MiB = 1 << 20
MARK = b"popek-crypt-MARK-0123456789"


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("POPEK_HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    return tmp_path / "home"


@pytest.fixture
def argvs(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """Every argv popek's storage runs (each still runs for real)."""
    seen: list[list[str]] = []
    real_run, real_popen = proc.run, subprocess.Popen

    def run(argv: list[str], timeout: float, **kw: Any) -> Any:
        seen.append(list(argv))
        return real_run(argv, timeout, **kw)

    class Popen(real_popen):  # type: ignore[misc,valid-type]
        def __init__(self, argv: list[str], *a: Any, **kw: Any) -> None:
            seen.append(list(argv))
            super().__init__(argv, *a, **kw)

    monkeypatch.setattr(dirpool.proc, "run", run)
    monkeypatch.setattr(dirpool.subprocess, "Popen", Popen)
    return seen


@pytest.fixture
def storage(home: Path) -> Iterator[Storage]:
    store = SQLiteStore(home / "state.db")
    secrets = Secrets()
    yield Storage(store, secrets.volume_key)
    store.close()


def _io(path: Path, key: str | None, *commands: str, layers: int = 1) -> str:
    """Run qemu-io on ``path`` (the key through a pipe); its output."""
    with dirpool.key_pipe(key) as (objects, fds):
        image = (["--image-opts", dirpool.image_opts(path, layers)] if key
                 else ["-f", "qcow2", str(path)])
        args = [x for c in commands for x in ("-c", c)]
        done = subprocess.run(["qemu-io", *objects, *image, *args], capture_output=True,
                              text=True, pass_fds=fds, check=False)
    assert done.returncode == 0 and "error" not in done.stdout.lower(), done
    return done.stdout


def _info(path: Path) -> dict[str, Any]:
    out = subprocess.run(["qemu-img", "info", "-U", "--output", "json", str(path)],
                         capture_output=True, text=True, check=True).stdout
    return dict(json.loads(out))


# -- the secret store ---------------------------------------------------------------
def test_keys_are_per_project_stable_and_kept_0600_in_0700(home: Path) -> None:
    s = Secrets()
    a, b = s.volume_key("default", create=True), s.volume_key("team", create=True)
    assert a != b and len(a) == 64 and int(a, 16) >= 0
    assert Secrets().volume_key("default") == a  # read again: the same key
    root = home / "trust" / "secrets"
    for d in (root, root / "volumes"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700
    for f in (root / "host.key", root / "volumes" / "default.key"):
        assert stat.S_IMODE(f.stat().st_mode) == 0o600
    # the file holds the key wrapped: neither its hex nor its bytes are in it
    blob = (root / "volumes" / "default.key").read_bytes()
    assert a.encode() not in blob and bytes.fromhex(a) not in blob
    assert sorted(p.name for p in (root / "volumes").iterdir()) == ["default.key", "team.key"]


def test_a_key_moved_to_another_project_does_not_unwrap(home: Path) -> None:
    s = Secrets()
    s.volume_key("alpha", create=True)
    s.volume_key("beta", create=True)
    vols = home / "trust" / "secrets" / "volumes"
    os.replace(vols / "alpha.key", vols / "beta.key")  # an attacker swaps the files
    with pytest.raises(SecretError, match="does not unwrap"):
        s.volume_key("beta")


def test_a_key_readable_by_others_is_refused(home: Path) -> None:
    s = Secrets()
    s.volume_key("default", create=True)
    os.chmod(s.key_path("default"), 0o644)
    with pytest.raises(SecretError, match="readable by others"):
        s.volume_key("default")


def test_a_missing_key_is_a_clear_error(home: Path) -> None:
    s = Secrets()
    with pytest.raises(NotFound, match="host key .* is missing"):
        s.volume_key("default")
    s.volume_key("other", create=True)
    with pytest.raises(NotFound, match="project 'default' has no volume key"):
        s.volume_key("default")


def test_concurrent_first_uses_agree_on_one_key(home: Path) -> None:
    got: list[str] = []
    go = threading.Barrier(8)

    def make() -> None:
        go.wait()
        got.append(Secrets().volume_key("default", create=True))

    threads = [threading.Thread(target=make) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 8 and len(set(got)) == 1
    left = [p.name for p in (home / "trust" / "secrets").rglob("*") if p.name.startswith(".")]
    assert left == []  # no temporary file stays


def test_remove_and_purge(home: Path) -> None:
    s = Secrets()
    s.volume_key("team", create=True)
    assert s.remove("team") and not s.has_key("team") and not s.remove("team")
    s.purge()
    assert not (home / "trust" / "secrets").exists()


# -- encrypted volumes --------------------------------------------------------------
def test_an_encrypted_volume_hides_its_data_and_keeps_working(
        storage: Storage, home: Path, argvs: list[list[str]], tmp_path: Path) -> None:
    vol = storage.create_volume("local", "default", "sec", 16 * MiB, encrypt=True)
    key = Secrets().volume_key("default")
    driver = storage._driver(storage.pool("local"))
    f = driver.file("default", "sec", "block")
    assert storage.volume_info("local", "default", "sec")["encrypted"] is True
    assert _info(f)["encrypted"] is True and vol.config == {"encrypt": "luks"}
    _io(f, key, f"write -P 0x41 0 {MiB}")
    plain = storage.create_volume("local", "default", "plain", 16 * MiB)
    pf = driver.file("default", "plain", "block")
    assert storage.volume_info("local", "default", "plain")["encrypted"] is False
    # the string written through QEMU's block layer: in the plain file, not the encrypted
    _write_mark(f, key)
    _write_mark(pf, None)
    assert MARK in pf.read_bytes() and MARK not in f.read_bytes()
    assert plain.config == {}

    # snapshot, write more, restore: the snapshot's data; every layer encrypted
    storage.snapshot_volume("local", "default", "sec", "s1")
    _io(f, key, f"write -P 0x42 0 {MiB}", layers=2)
    storage.snapshot_volume("local", "default", "sec", "s2")
    assert all(_info(x)["encrypted"] for x in driver.chain("default", "sec"))
    assert len(driver.chain("default", "sec")) == 3
    storage.restore_volume("local", "default", "sec", "s1")
    _io(f, key, f"read -P 0x41 0 {MiB}", layers=2)
    assert MARK not in b"".join(x.read_bytes() for x in driver.chain("default", "sec"))
    # clone (same project, same key), resize, delete a snapshot in the middle
    storage.clone_volume("local", "default", "sec", "s2", "copy")
    cf = driver.file("default", "copy", "block")
    assert storage.volume("local", "default", "copy").config == {"encrypt": "luks"}
    _io(cf, key, f"read -P 0x42 0 {MiB}", layers=3)
    storage.resize_volume("local", "default", "copy", 32 * MiB)
    assert _info(cf)["virtual-size"] == 32 * MiB
    storage.delete_volume("local", "default", "copy")
    storage.delete_snapshot("local", "default", "sec", "s1")  # merged into s2 and the volume
    assert len(driver.chain("default", "sec")) == 1
    assert [b for b in (_info(driver.file("default", "sec", "block")).get("backing-filename"),)
            if b] == []
    _io(f, key, f"read -P 0x41 0 {MiB}")
    _io(driver.snapshot_file("default", "sec", "s2"), key, f"read -P 0x42 0 {MiB}")
    # export decrypts to a plain file; import encrypts again
    out = tmp_path / "out.raw"
    storage.export_volume("local", "default", "sec", out, "raw")
    data = out.read_bytes()
    assert data[:MiB] == b"\x41" * MiB and MARK in data
    storage.import_volume("local", "default", "back", out, encrypt=True)
    bf = driver.file("default", "back", "block")
    assert _info(bf)["encrypted"] is True and MARK not in bf.read_bytes()
    _io(bf, key, f"read -P 0x41 0 {MiB}")
    # no key ever on a command line, every qemu-img that needed it had a pipe
    assert argvs and not any(key in " ".join(a) for a in argvs)
    assert any("secret,id=popek-volume-key,file=/dev/fd/" in " ".join(a) for a in argvs)


def _write_mark(path: Path, key: str | None) -> None:
    with dirpool.key_pipe(key) as (objects, fds):
        image = ["--image-opts", dirpool.image_opts(path, 1)] if key else ["-f", "qcow2",
                                                                            str(path)]
        src = path.parent / f".{path.name}.mark"
        src.write_bytes(MARK * 64)
        try:
            subprocess.run(["qemu-io", *objects, *image, "-c", f"write -s {src} {2 * MiB} "
                            f"{len(MARK) * 64}"], check=True, capture_output=True,
                           pass_fds=fds)
        finally:
            src.unlink()


def test_encrypt_refused_for_filesystem_volumes_and_without_a_store(
        storage: Storage, home: Path) -> None:
    with pytest.raises(InvalidInput, match="applies to block volumes"):
        storage.create_volume("local", "default", "fs", 32 * MiB, "filesystem", encrypt=True)
    with pytest.raises(EngineError, match="secret store"):
        Storage(storage.store).create_volume("local", "default", "x", 16 * MiB, encrypt=True)
    assert storage.volumes() == []


def test_an_encrypted_volume_without_its_key_is_refused_clearly(storage: Storage,
                                                               home: Path) -> None:
    storage.create_volume("local", "default", "sec", 16 * MiB, encrypt=True)
    Secrets().remove("default")
    with pytest.raises(NotFound, match="no volume key"):
        storage.snapshot_volume("local", "default", "sec", "s1")
    with pytest.raises(NotFound, match="no volume key"):
        storage.resize_volume("local", "default", "sec", 32 * MiB)
    with pytest.raises(NotFound, match="no volume key"):
        storage.export_volume("local", "default", "sec", home / "out.raw", "raw")
    vol = storage.volume("local", "default", "sec")
    assert vol.state == "ready" and vol.snapshots == [] and vol.size == 16 * MiB
    assert not (home / "out.raw").exists()  # nothing changed, nothing written


# -- QEMU: the key by a FIFO, never the command line ---------------------------------
def test_qemu_argv_names_a_secret_object_never_the_key(tmp_path: Path) -> None:
    argv = [*cmdline.secret_args(tmp_path, [False, True]),
            *cmdline.disk_args([("local/plain", [10]), ("local/sec", [11, 12])],
                              keyed=[False, True])]
    objects = [argv[i + 1] for i, a in enumerate(argv) if a == "-object"
               and "throttle-group" not in argv[i + 1]]  # the I/O limits' groups
    assert objects == [f"secret,id=vol1-key,file={tmp_path}/disk1.key"]
    nodes = [json.loads(argv[i + 1]) for i, a in enumerate(argv) if a == "-blockdev"]
    qcow2 = {n["node-name"]: n.get("encrypt") for n in nodes if n["driver"] == "qcow2"}
    assert qcow2 == {"vol0-0": None, "vol1-1": {"format": "luks", "key-secret": "vol1-key"},
                     "vol1-0": {"format": "luks", "key-secret": "vol1-key"}}


def test_the_key_fifo_gives_the_key_once_and_leaves_nothing(tmp_path: Path) -> None:
    path = tmp_path / "disk0.key"
    fifo = KeyFifo(path, "ab" * 32, os.getuid(), os.getgid())
    assert stat.S_ISFIFO(path.lstat().st_mode) and stat.S_IMODE(path.lstat().st_mode) == 0o600
    assert path.read_text() == "ab" * 32  # the first reader gets it whole, then EOF
    fifo.close()
    assert fifo.read and not path.exists()
    # nobody read it: close takes the key back and returns at once
    unread = KeyFifo(path, "cd" * 32, os.getuid(), os.getgid())
    unread.close()
    assert not unread.read and not path.exists()


def test_the_key_fifo_replaces_a_planted_link(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_text("x")
    (tmp_path / "disk0.key").symlink_to(target)
    fifo = KeyFifo(tmp_path / "disk0.key", "ef" * 32, os.getuid(), os.getgid())
    fifo.close()
    assert target.read_text() == "x"  # the link was removed, not followed


def test_an_encrypted_merge_cut_between_its_steps_is_finished(
        storage: Storage, home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Deleting a snapshot of an encrypted chain rebases onto a ``json:`` name, then sets
    the plain name; a run that stops between the two is finished by the next."""
    storage.create_volume("local", "default", "sec", 16 * MiB, encrypt=True)
    key = Secrets().volume_key("default")
    driver = storage._driver(storage.pool("local"))
    f = driver.file("default", "sec", "block")
    _io(f, key, f"write -P 0x41 0 {MiB}")
    storage.snapshot_volume("local", "default", "sec", "s1")
    _io(f, key, f"write -P 0x42 {MiB} {MiB}", layers=2)
    storage.snapshot_volume("local", "default", "sec", "s2")
    real = dirpool._run

    def cut(argv: list[str], what: str, key: str | None = None) -> str:
        if argv[:3] == ["qemu-img", "rebase", "-q"] and "-u" in argv:
            raise KeyboardInterrupt  # killed after the merge, before the name is set
        return real(argv, what, key)

    monkeypatch.setattr(dirpool, "_run", cut)
    with pytest.raises(KeyboardInterrupt):
        driver.delete_snapshot("default", "sec", "s2", ["s1"], key)
    assert _info(f)["backing-filename"].startswith("json:")
    monkeypatch.setattr(dirpool, "_run", real)
    driver.delete_snapshot("default", "sec", "s2", ["s1"], key)
    assert _info(f)["backing-filename"] == "sec@s1.qcow2"
    assert not driver.snapshot_file("default", "sec", "s2").exists()
    _io(f, key, f"read -P 0x41 0 {MiB}", f"read -P 0x42 {MiB} {MiB}", layers=2)


def test_reconcile_without_a_key_leaves_that_volume_and_settles_the_rest(
        storage: Storage, home: Path) -> None:
    """A dead snapshot of an encrypted volume whose key is gone cannot be finished: it is
    reported and left as it is (files kept), and another project's work still settles."""
    from popek.storage.model import volume_key

    storage.create_volume("local", "default", "sec", 16 * MiB, encrypt=True)
    storage.create_volume("local", "other", "plain", 16 * MiB)
    driver = storage._driver(storage.pool("local"))
    os.rename(driver.file("default", "sec", "block"),
              driver.snapshot_file("default", "sec", "s1"))  # killed after the freeze
    for project, name, state, pending in (("default", "sec", "snapshotting", "s1"),
                                          ("other", "plain", "resizing", "")):
        vol = storage.volume("local", project, name)
        dead = {**vol.__dict__, "state": state, "owner": "1 1", "pending": pending}
        del dead["revision"]
        storage.store.put(volume_key("local", project, name),
                          type(vol)(**dead).to_json())
    Secrets().remove("default")
    done = storage.reconcile()
    assert any("default/sec left snapshotting" in d and "no volume key" in d for d in done)
    assert any("other/plain: interrupted resize settled" in d for d in done)
    assert storage.volume("local", "default", "sec").state == "snapshotting"
    assert driver.snapshot_file("default", "sec", "s1").exists()
    assert storage.volume("local", "other", "plain").state == "ready"


def test_qemu_s_luks_timing_flake_is_tried_again(storage: Storage, home: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """QEMU 7.2 now and then fails a LUKS create with 'Unable to get accurate CPU usage'
    (its PBKDF timing measured 0 ms on a busy host); that run cannot be caused at will,
    so the first create answers it (a stand-in), then the real qemu-img runs."""
    calls: list[list[str]] = []
    real = proc.run

    def flaky(argv: list[str], timeout: float, **kw: Any) -> Any:
        calls.append(argv)
        if len(calls) == 1:
            return subprocess.CompletedProcess(argv, 1, "", f"qemu-img: x: {dirpool.LUKS_TIMING}\n")
        return real(argv, timeout, **kw)

    monkeypatch.setattr(dirpool.proc, "run", flaky)
    storage.create_volume("local", "default", "sec", 16 * MiB, encrypt=True)
    assert len(calls) == 2 and calls[0][:2] == calls[1][:2] == [calls[0][0], "create"]
    assert _info(storage._driver(storage.pool("local")).file("default", "sec",
                                                              "block"))["encrypted"] is True
