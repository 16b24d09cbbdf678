"""core.hostcare's choices that need no root: which processes are a home's (fake /proc)."""

from __future__ import annotations

from pathlib import Path

from popek.core import hostcare


def _proc(root: Path, pid: int, comm: str, *argv: str) -> None:
    d = root / str(pid)
    d.mkdir()
    (d / "comm").write_text(comm + "\n")
    (d / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")


def test_home_processes_are_popeks_helpers_with_the_homes_files(tmp_path: Path) -> None:
    home, other, procs = tmp_path / "home", tmp_path / "other", tmp_path / "proc"
    for d in (home, other, procs):
        d.mkdir()
    _proc(procs, 10, "qemu-system-x86", "qemu-system-x86_64", "-pidfile",
          f"{home}/instances/default/web/qemu.pid")
    _proc(procs, 11, "swtpm", "swtpm", "socket", f"--tpmstate=dir={home}/instances/default/web/tpm")
    _proc(procs, 12, "dnsmasq", "dnsmasq", f"--pid-file={home}/networks/lan/dnsmasq.pid")
    _proc(procs, 13, "python3", "python3", "-I", "-c", "...", f"{home}/instances/default/web/fifo")
    # another home's helpers, a user's editor on the home's files, and the home's own
    # store in an argument that is not an instance's or a network's: none of them
    _proc(procs, 20, "swtpm", "swtpm", f"--tpmstate=dir={other}/instances/default/web/tpm")
    _proc(procs, 21, "vim", "vim", f"{home}/instances/default/web/console.log")
    _proc(procs, 22, "python3", "python3", f"{home}/state.db")
    (procs / "self").mkdir()
    assert hostcare.home_processes(home, procs) == {10: "qemu-system-x86", 11: "swtpm",
                                                    12: "dnsmasq", 13: "python3"}
    assert hostcare.home_processes(other, procs) == {20: "swtpm"}


def test_registered_homes_are_those_whose_store_still_exists(tmp_path: Path) -> None:
    from popek.state import hostwide

    registry, alive, gone = tmp_path / "host", tmp_path / "alive", tmp_path / "gone"
    assert hostwide.homes(registry) == set()  # no registry: no home, and none made
    assert not registry.exists()
    for n, home in enumerate((alive, gone)):
        home.mkdir()
        (home / "state.db").touch()
        assert hostwide.HostIds(home, registry).reserve(1000 + 100 * n, 10, "w", dict)
    assert hostwide.homes(registry) == {str(alive.resolve()), str(gone.resolve())}
    (gone / "state.db").unlink()
    assert hostwide.homes(registry) == {str(alive.resolve())}


def test_shared_directories_go_whole_unless_something_is_mounted_below(tmp_path: Path) -> None:
    jail, stage, missing = tmp_path / "jail", tmp_path / "stage", tmp_path / "missing"
    (jail / "dev").mkdir(parents=True)
    (jail / "dev" / "null").touch()  # the jail's placeholders are files
    stage.mkdir()
    report = hostcare.Report()
    hostcare.remove_shared(report, (jail, stage, missing), root=tmp_path / "cgroup")
    assert not jail.exists() and not stage.exists()
    assert report.done == [f"removed {jail}", f"removed {stage}"] and report.failed == []
    # a directory with a mount below it is kept, and the report says why
    report = hostcare.Report()
    hostcare.remove_shared(report, (Path("/proc"),), root=tmp_path / "cgroup")
    assert report.failed == ["kept /proc: /proc is mounted"] and Path("/proc/self").exists()
