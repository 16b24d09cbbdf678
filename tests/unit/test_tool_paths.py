"""The tools popek runs come from the system's directories, never from the caller's PATH."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from popek import proc
from popek.engines.container import runtime
from popek.engines.qemu import cmdline
from popek.errors import EngineError


@pytest.fixture
def planted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A directory first on PATH with a fake of every tool popek looks up."""
    for name in (cmdline.QEMU_BINARY, "runc", "bwrap", "nft", "dnsmasq", "swtpm", "zstd"):
        fake = tmp_path / name
        fake.write_text("#!/bin/sh\nexit 1\n")
        fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ.get('PATH', '')}")
    return tmp_path


def test_a_planted_path_is_not_looked_in(planted: Path) -> None:
    assert shutil.which("nft") == str(planted / "nft")  # what a PATH lookup would run
    for name in ("nft", "dnsmasq", cmdline.QEMU_BINARY, "runc", "bwrap", "swtpm", "zstd"):
        found = proc.tool(name)
        assert found is None or not found.startswith(str(planted)), found
        assert found is None or os.path.dirname(found) in proc.TOOL_PATH.split(":")
    qemu = proc.tool(cmdline.QEMU_BINARY)
    if qemu is not None:  # installed by scripts/setup.sh
        assert cmdline.find_qemu() == qemu


def test_a_missing_tool_names_where_it_was_looked_for(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(proc, "TOOL_PATH", "/nonexistent")
    with pytest.raises(EngineError, match=r"qemu-system-x86_64 not found in /nonexistent; "
                                          r"install the Debian package qemu-system-x86"):
        cmdline.find_qemu()
    with pytest.raises(EngineError, match="OCI runtime 'runc' not found in /nonexistent"):
        runtime.choose("runc")


def test_tc_and_ip_run_from_the_system_whatever_path_says(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from popek.network import shaping

    for name in ("tc", "ip", "nsenter"):
        fake = tmp_path / name
        fake.write_text("#!/bin/sh\necho planted\n")
        fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ.get('PATH', '')}")
    assert shutil.which("tc") == str(tmp_path / "tc")  # a lookup in PATH finds the plant
    out = shaping._qdiscs("lo")
    assert "planted" not in out and "qdisc" in out
