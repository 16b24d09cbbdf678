"""A real system container on runc, driven through the real CLI from launch to delete.

The tests share one container and run in order, as in test_vm_lifecycle.py:
every verb that works on a VM works on a container with the same output.
"""

from __future__ import annotations

import contextlib
import os
import pty
import select
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from framework import (
    POPEK,
    container_cgroup,
    instance,
    popek,
    popek_json,
    processes_mentioning,
    wait_for,
)

CT = "ctlife"


@pytest.fixture(scope="module")
def ct(minimal_image: str) -> Iterator[str]:
    popek("launch", minimal_image, CT, "--container", "--memory", "128MiB", "--pids", "200")
    yield CT
    popek("delete", "--force", CT, check=False)


def _utime(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2:].split()[11])


def _written(ct: str) -> int:
    """Bytes the container's processes have written so far (``wchar`` of each)."""
    total = 0
    for pid in (container_cgroup(ct, "pids") / "cgroup.procs").read_text().split():
        with contextlib.suppress(OSError):  # a dd that ended meanwhile
            io = Path(f"/proc/{pid}/io").read_text().split()
            total += int(io[io.index("wchar:") + 1])
    return total


def test_launch_runs_init_as_an_unprivileged_uid_range(ct: str) -> None:
    info = popek_json("info", ct)
    assert info["state"] == "running" and info["engine"] == "container"
    assert info["runtime"] == "runc"  # crun 1.8 refuses this hybrid cgroup host
    assert info["container_status"] == "running"
    host_uid = Path(f"/proc/{info['pid']}").stat().st_uid
    assert host_uid == info["uid"] >= 1_000_000_000
    assert "popek-guest: ready" in popek("console", "--log", ct).stdout


def test_exec_passes_stdout_stderr_exit_code_and_stdin(ct: str) -> None:
    proc = popek("exec", ct, "--", "sh", "-c", "echo out; echo err >&2; exit 7", check=False)
    assert (proc.returncode, proc.stdout, proc.stderr) == (7, "out\n", "err\n")
    assert popek("exec", ct, "--", "tr", "a-z", "A-Z", stdin=b"hi\n").stdout == "HI\n"
    assert popek("exec", ct, "--", "id", "-u").stdout == "0\n"  # root inside, not outside
    assert popek("exec", ct, "--", "hostname").stdout == f"{ct}\n"


def test_exec_with_a_terminal(ct: str) -> None:
    pid, fd = pty.fork()
    if pid == 0:
        os.execv(POPEK[0], [*POPEK, "exec", ct, "--", "sh", "-c", "tty; exit 3"])
    out = b""
    try:
        while True:
            ready, _, _ = select.select([fd], [], [], 10)
            if not ready:
                break
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
        _, status = os.waitpid(pid, 0)
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
    assert b"/dev/pts/" in out, out
    assert os.waitstatus_to_exitcode(status) == 3


def test_pause_freezes_every_process(ct: str) -> None:
    popek("exec", ct, "--", "sh", "-c", "while :; do :; done >/dev/null 2>&1 &")
    procs = container_cgroup(ct, "pids") / "cgroup.procs"
    init = popek_json("info", ct)["pid"]
    spinner = next(int(p) for p in procs.read_text().split() if int(p) != init
                   and _utime(int(p)) >= 0 and b"sh" in Path(f"/proc/{p}/comm").read_bytes())
    popek("pause", ct)
    try:
        assert instance(ct)["state"] == "paused"
        assert popek_json("info", ct)["container_status"] == "paused"
        refused = popek("exec", ct, "--", "true", check=False)
        assert refused.returncode != 0 and "paused" in refused.stderr
        before = _utime(spinner)
        # not synchronisation: the window in which a running spinner would have ticked
        time.sleep(1.5)
        assert _utime(spinner) == before  # frozen: not one tick of CPU
    finally:
        popek("resume", ct)
    before = _utime(spinner)
    wait_for(lambda: _utime(spinner) > before, 10, "the resumed spinner to use CPU again")
    os.kill(spinner, signal.SIGKILL)


def test_pause_holds_while_the_container_floods_its_disk(ct: str) -> None:
    # cgroup v1's freezer gives up while a task sleeps in I/O: without popek trying
    # again, about one pause in ten failed here ("unable to freeze")
    flood = ("(while :; do dd if=/dev/zero of=/flood bs=1M count=64 conv=fsync 2>/dev/null; "
             "rm -f /flood; done) </dev/null >/dev/null 2>&1 & echo $!")
    loop = int(popek("exec", ct, "--", "sh", "-c", flood).stdout)
    try:
        for _ in range(10):
            # each pause meets the flood writing: wait until it has written more
            written = _written(ct)
            wait_for(lambda w=written: _written(ct) > w, 30, "the container to write")
            popek("pause", ct)
            assert instance(ct)["state"] == "paused"
            popek("resume", ct)
    finally:
        # clean-up inside the container, not checked: the flood's last dd may still run
        popek("exec", ct, "--", "sh", "-c", f"kill {loop}; sleep 0.5; rm -f /flood",
              check=False)
    assert instance(ct)["state"] == "running"


def test_config_set_changes_limits_live(ct: str) -> None:
    popek("config", "set", ct, "limits.memory", "96MiB")
    popek("config", "set", ct, "limits.pids", "150")
    usage = popek_json("info", ct)["usage"]
    assert usage["memory_limit"] == 96 << 20 and usage["pids_limit"] == 150
    assert 0 < usage["memory"] < 96 << 20 and usage["pids"] >= 1
    shown = popek_json("config", "show", ct)
    assert (shown["limits.memory"], str(shown["limits.pids"])) == ("96MiB", "150")


@pytest.mark.parametrize(("key", "value", "message"), [
    ("limits.memory", "1MiB", "at least 64MiB"),
    ("limits.memory", "lots", "invalid limits.memory"),
    ("limits.memory", "4TiB", "this host has only"),
    ("limits.pids", "3", "from 16 to"),
    ("limits.cpu", "99", "this host has only"),
    ("limits.cpu", "x", "whole number"),
    ("limits.gpu", "1", "unknown key 'limits.gpu'; allowed"),
    ("limits.disk", "1", "invalid limits.disk '1'"),
])
def test_config_set_refuses_out_of_range(ct: str, key: str, value: str, message: str) -> None:
    before = popek("config", "show", ct).stdout
    proc = popek("config", "set", ct, key, value, check=False)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr
    assert popek("config", "show", ct).stdout == before


def test_graceful_stop_then_start(ct: str) -> None:
    proc = popek("stop", ct, "--timeout", "20")
    assert "graceful" in proc.stdout
    entry = instance(ct)
    assert entry["state"] == "stopped" and entry["pid"] is None
    assert "popek-guest: shutdown" in popek("console", "--log", ct).stdout
    popek("start", ct)
    assert popek("exec", ct, "--", "cat", "/etc/hostname").returncode == 0
    # limits set while it ran survive a restart
    assert popek_json("info", ct)["usage"]["memory_limit"] == 96 << 20


def test_kill9_of_init_shows_stopped_with_reason(ct: str) -> None:
    os.kill(popek_json("info", ct)["pid"], signal.SIGKILL)
    wait_for(lambda: instance(ct)["state"] == "stopped", 10, "the container to be seen stopped")
    assert "exited unexpectedly" in instance(ct)["reason"]
    popek("restart", ct)
    assert instance(ct)["state"] == "running"


def test_delete_leaves_nothing_behind(ct: str, popek_home: Path) -> None:
    info = popek_json("info", ct)
    popek("delete", "--force", ct)
    assert not Path(info["workdir"]).exists()
    assert processes_mentioning(info["workdir"]) == []
    # init may linger a moment as a zombie until the host's pid 1 reaps it
    wait_for(lambda: not Path(f"/proc/{info['pid']}").exists(), 5, "init to be reaped")
    for controller in ("memory", "pids", "cpu"):
        assert not container_cgroup(ct, controller).exists()
    assert not (popek_home / "oci" / "runc" / f"popek-default-{ct}").exists()


def test_broken_rootfs_refused_and_nothing_left(popek_home: Path, minimal_image: str,
                                                tmp_path_factory: pytest.TempPathFactory) -> None:
    other = Path(str(tmp_path_factory.mktemp("tampered-ct")))
    other.chmod(0o755)
    shutil.copytree(popek_home / "images", other / "images")
    tar = other / "images" / "minimal" / "rootfs.tar"
    data = bytearray(tar.read_bytes())
    data[len(data) // 3] ^= 0x01
    tar.write_bytes(bytes(data))
    env = dict(os.environ, POPEK_HOME=str(other))
    # the copy's signature is by the session's key: sign it with this home's own key, so
    # that the signature holds and the flipped byte is what the launch trips on
    popek("image", "sign", "minimal", env=env)
    proc = popek("launch", "minimal", "bad", "--container", check=False, env=env)
    assert proc.returncode != 0 and "rootfs.tar" in proc.stderr and "sha256" in proc.stderr
    assert not (other / "instances" / "default" / "bad").exists()
    # no base was made from the bad tar, not even half of one
    bases = other / "rootfs-bases"
    assert not bases.exists() or list(bases.iterdir()) == []
    assert popek("list", "--format", "json", env=env).stdout.strip() == "[]"


@pytest.mark.parametrize(("args", "message"), [
    (["--runtime", "lxc"], "unknown runtime 'lxc'; allowed: auto, runc, crun"),
    (["--pids", "2"], "from 16 to"),
    (["--mount", "/etc:/mnt"], "not allowed"),
    (["--mount", "relative:/mnt"], "absolute"),
    (["--mount", "/nonexistent-dir:/mnt"], "not an existing directory"),
])
def test_container_bad_input(minimal_image: str, popek_home: Path, args: list[str],
                             message: str) -> None:
    proc = popek("launch", minimal_image, "badct", "--container", *args, check=False)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr
    assert "badct" not in [e["name"] for e in popek_json("list")]
    assert not (popek_home / "instances" / "default" / "badct").exists()


def test_crun_on_a_hybrid_host_fails_cleanly(minimal_image: str, popek_home: Path) -> None:
    if not shutil.which("crun") or (Path("/sys/fs/cgroup/cgroup.controllers").exists()
                                    and not Path("/sys/fs/cgroup/memory").is_dir()):
        pytest.skip("needs crun on a cgroup v1/hybrid host")
    proc = popek("launch", minimal_image, "crunct", "--container", "--runtime", "crun",
                 check=False)
    if proc.returncode == 0:  # a crun that handles this host: fine, clean up
        popek("delete", "--force", "crunct")
        return
    assert "crun" in proc.stderr
    assert "crunct" not in [e["name"] for e in popek_json("list")]
    assert not (popek_home / "instances" / "default" / "crunct").exists()
