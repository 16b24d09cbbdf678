"""``popek admin reset`` and ``popek admin boot`` against the real host (issue 13.8).

Each test runs in a home of its own (not the session's ``popek_home``),
since reset takes a whole home off the host: the checks look only at what
carries that home's id or tag, and the other homes of the people who run
tests on this machine at the same time are left alone by construction.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from framework import REPO, popek

TAG = "htour"


@pytest.fixture
def home() -> Iterator[Path]:
    """A private POPEK_HOME with the minimal image, removed (purged) at the end."""
    if os.geteuid() != 0:
        pytest.skip("integration tests need root")
    path = Path(tempfile.mkdtemp(prefix=f"popek-{TAG}-", dir="/var/tmp"))
    path.chmod(0o755)
    env = {**os.environ, "POPEK_HOME": str(path),
           "POPEK_CACHE": os.environ.get("POPEK_CACHE", str(REPO / ".cache" / "popek"))}
    saved = os.environ.copy()
    os.environ.update(env)
    try:
        popek("image", "build", "minimal", timeout=900)
        yield path
    finally:
        if path.exists():
            popek("admin", "reset", "--purge", "--yes", check=False)
        shutil.rmtree(path, ignore_errors=True)
        os.environ.clear()
        os.environ.update(saved)


def home_id(home: Path) -> str:
    return hashlib.sha256(str(home.resolve()).encode()).hexdigest()[:12]


def links_of(home: Path) -> list[str]:
    """The pk-* devices tagged with ``home``'s alias."""
    tag = "popek:" + home_id(home)
    out = json.loads(subprocess.run(["ip", "-j", "link", "show"], capture_output=True,
                                    text=True, check=True).stdout)
    return [link["ifname"] for link in out
            if link["ifname"].startswith("pk-") and link.get("ifalias") == tag]


def tables_of(home: Path) -> list[str]:
    name = "popek-" + hashlib.sha256(str(home.resolve()).encode()).hexdigest()[:8]
    out = json.loads(subprocess.run(["nft", "-j", "list", "tables"], capture_output=True,
                                    text=True, check=True).stdout)
    return [f"{t['table']['family']} {t['table']['name']}" for t in out["nftables"]
            if "table" in t and t["table"]["name"] == name]


def cgroups_of(home: Path) -> list[Path]:
    """Every cgroup directory of ``home``, under every hierarchy (v1 and v2)."""
    return sorted(Path("/sys/fs/cgroup").glob(f"*/popek/{home_id(home)}-*")) + \
        sorted(Path("/sys/fs/cgroup").glob(f"popek/{home_id(home)}-*"))


def dnsmasqs_of(home: Path) -> list[int]:
    marker = f"--pid-file={home}/networks/".encode()
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if marker in (d / "cmdline").read_bytes():
                    pids.append(int(d.name))
            except OSError:
                pass
    return pids


def runc_ids(home: Path) -> list[str]:
    out = subprocess.run(["runc", "--root", str(home / "oci" / "runc"), "list", "-q"],
                         capture_output=True, text=True, check=False).stdout
    return out.split()


def states(home: Path) -> dict[str, str]:
    return {e["name"]: e["state"] for e in json.loads(popek("list", "--format", "json").stdout)}


@pytest.fixture
def other_home(home: Path) -> Iterator[Path]:
    """A second home with a network on the host: what a reset of ``home`` must not touch."""
    path = Path(tempfile.mkdtemp(prefix=f"popek-{TAG}-other-", dir="/var/tmp"))
    path.chmod(0o755)
    env = {**os.environ, "POPEK_HOME": str(path)}
    try:
        popek("network", "create", f"{TAG}o", env=env)
        yield path
    finally:
        popek("admin", "reset", "--purge", "--yes", env=env, check=False)
        shutil.rmtree(path, ignore_errors=True)


def test_reset_removes_this_homes_host_pieces_and_keeps_its_data(home: Path,
                                                                 other_home: Path) -> None:
    net = f"{TAG}r"
    popek("network", "create", net)
    theirs = (links_of(other_home), tables_of(other_home), dnsmasqs_of(other_home))
    assert all(theirs)
    popek("launch", "minimal", f"{TAG}-c", "--container", "--network", net)
    popek("launch", "minimal", f"{TAG}-v", "--network", net, "--memory", "256MiB",
          timeout=600)
    assert links_of(home) and tables_of(home) and cgroups_of(home) and dnsmasqs_of(home)

    refused = popek("admin", "reset", check=False)  # no terminal, no --yes: nothing done
    assert refused.returncode != 0 and "--yes" in refused.stderr
    assert states(home) == {f"{TAG}-c": "running", f"{TAG}-v": "running"}

    out = popek("admin", "reset", "--yes").stdout
    assert f"stopped instance {TAG}-c" in out and f"stopped instance {TAG}-v" in out
    assert "removed bridge" in out and "nftables" in out
    assert links_of(home) == [] and tables_of(home) == [] and cgroups_of(home) == []
    assert dnsmasqs_of(home) == [] and runc_ids(home) == []
    # the other home keeps all of its own, and what homes share stays while it is there
    assert (links_of(other_home), tables_of(other_home), dnsmasqs_of(other_home)) == theirs
    assert "kept what homes share" in out
    # the data stays: records, images, keys, the audit log (with the reset in it)
    assert states(home) == {f"{TAG}-c": "stopped", f"{TAG}-v": "stopped"}
    assert (home / "images" / "minimal").is_dir()
    audit = json.loads(popek("audit", "log", "--format", "json").stdout)
    assert [r["result"] for r in audit if r["op"] == "host.reset"][-2:] == ["started", "ok"]

    # --purge takes the rest, the home included
    out = popek("admin", "reset", "--purge", "--yes").stdout
    assert f"deleted network {net}" in out and f"removed {home}" in out
    assert not home.exists()
    assert links_of(home) == [] and tables_of(home) == [] and cgroups_of(home) == []
    assert (links_of(other_home), tables_of(other_home), dnsmasqs_of(other_home)) == theirs


def test_boot_brings_networks_back_and_starts_autostart_instances_only(home: Path) -> None:
    net = f"{TAG}b"
    popek("network", "create", net)
    info = json.loads(popek("network", "info", net, "--format", "json").stdout)
    bridge_name, gateway = info["bridge"]["name"], info["gateway"]
    popek("launch", "minimal", f"{TAG}-auto", "--container", "--network", net)
    popek("config", "set", f"{TAG}-auto", "boot.autostart", "true")
    popek("launch", "minimal", f"{TAG}-manual", "--container", "--network", net)

    # a reboot, as far as the host side goes: the processes die, the bridge, its
    # dnsmasq and the nftables tables are gone
    for cid in runc_ids(home):
        subprocess.run(["runc", "--root", str(home / "oci" / "runc"), "kill", cid, "KILL"],
                       check=True)
    for pid in dnsmasqs_of(home):
        os.kill(pid, signal.SIGKILL)
    subprocess.run(["ip", "link", "del", bridge_name], check=True)
    for table in tables_of(home):
        subprocess.run(["nft", "delete", "table", *table.split()], check=True)

    out = popek("admin", "boot").stdout
    assert f"started instance {TAG}-auto (boot.autostart)" in out
    assert f"{TAG}-manual" not in out.replace(f"{TAG}-manual: stopped", "")
    assert states(home) == {f"{TAG}-auto": "running", f"{TAG}-manual": "stopped"}
    assert bridge_name in links_of(home) and len(tables_of(home)) == 2
    assert len(dnsmasqs_of(home)) == 1
    # the network works again: the container asks the network's dnsmasq, across the
    # bridge and the rules, for its own name
    ports = json.loads(popek("network", "info", net, "--format", "json").stdout)["ports"]
    ipv4 = next(p["ipv4"] for p in ports if p["instance"].endswith(f"/{TAG}-auto"))
    answer = popek("exec", f"{TAG}-auto", "--", "nslookup", f"{TAG}-auto.{net}.popek",
                   gateway).stdout
    assert ipv4 in answer
    # a second boot has nothing to start
    again = popek("admin", "boot").stdout
    assert "started instance" not in again


def test_make_uninstall_resets_then_removes_what_setup_installed(home: Path,
                                                                  tmp_path: Path) -> None:
    """scripts/uninstall.sh (``make uninstall``) in a copy of the checkout, DESTDIR for the
    system paths: the real popek (through a .venv/bin/popek of the copy) resets the home,
    then the unit, the completion scripts and the copy's .venv go."""
    popek("launch", "minimal", f"{TAG}-u", "--container")
    assert cgroups_of(home)
    checkout, dest = tmp_path / "checkout", tmp_path / "dest"
    (checkout / "scripts").mkdir(parents=True)
    shutil.copy(REPO / "scripts" / "uninstall.sh", checkout / "scripts")
    (checkout / ".venv" / "bin").mkdir(parents=True)
    wrapper = checkout / ".venv" / "bin" / "popek"
    # the command server is shared by everyone on this machine: the copy leaves it alone
    wrapper.write_text(f'#!/bin/sh\n[ "$1" = command-server ] && exit 0\n'
                       f'exec {REPO}/.venv/bin/popek "$@"\n')
    wrapper.chmod(0o755)
    installed = [dest / "etc/systemd/system/popek-boot.service",
                 dest / "usr/share/bash-completion/completions/popek",
                 dest / "usr/share/zsh/vendor-completions/_popek",
                 dest / "usr/share/fish/vendor_completions.d/popek.fish"]
    for f in installed:
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text("x\n")
    link = dest / "usr/local/bin/popek"  # setup's PATH link to this checkout's command
    link.parent.mkdir(parents=True)
    link.symlink_to(wrapper)
    out = subprocess.run(["bash", str(checkout / "scripts" / "uninstall.sh")],
                         env={**os.environ, "DESTDIR": str(dest)}, capture_output=True,
                         text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr
    assert f"stopped instance {TAG}-u" in out.stdout
    assert [f for f in installed if f.exists()] == []
    assert not os.path.lexists(link)
    assert not (checkout / ".venv").exists()
    assert cgroups_of(home) == [] and runc_ids(home) == []
    assert states(home) == {f"{TAG}-u": "stopped"}  # the data stays without PURGE=1


def test_reset_of_a_home_whose_records_are_lost_still_clears_the_host(home: Path) -> None:
    """Nothing in the store explains them: the VM's QEMU, swtpm and console logger, the
    container, the bridge and its dnsmasq are found by the home's id, tag and paths."""
    from popek.core.hostcare import home_processes

    net = f"{TAG}l"
    popek("network", "create", net)
    popek("launch", "minimal", f"{TAG}-lv", "--network", net, "--memory", "256MiB",
          timeout=600)
    popek("launch", "minimal", f"{TAG}-lc", "--container", "--network", net)
    comms = set(home_processes(home).values())
    assert {"swtpm", "dnsmasq"} <= comms and any(c.startswith("qemu") for c in comms)
    for f in home.glob("state.db*"):
        f.rename(f.with_name("lost-" + f.name))
    out = popek("admin", "reset", "--yes").stdout
    assert "killed stray processes of this home" in out
    assert home_processes(home) == {}
    assert links_of(home) == [] and tables_of(home) == [] and cgroups_of(home) == []
