"""Bad input gets a clear message, a non-zero exit, and changes nothing."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from framework import popek, popek_json, processes_mentioning


@pytest.fixture
def untouched(popek_home: Path, minimal_image: str) -> Iterator[None]:
    """Assert that the test changed no instance, file or process."""
    before = popek_json("list")
    inst_dir = popek_home / "instances"
    files_before = sorted(inst_dir.rglob("*")) if inst_dir.exists() else []
    yield
    assert popek_json("list") == before
    assert (sorted(inst_dir.rglob("*")) if inst_dir.exists() else []) == files_before


def _fails(*args: str, match: str, env: dict[str, str] | None = None) -> str:
    proc = popek(*args, check=False, env=env)
    assert proc.returncode != 0, proc.stdout
    assert match in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    return proc.stderr


@pytest.mark.usefixtures("untouched")
class TestLaunchRefused:
    def test_unknown_image(self) -> None:
        _fails("launch", "nosuchimage", "vm1", match="image 'nosuchimage' not found; available")

    def test_invalid_name(self) -> None:
        _fails("launch", "minimal", "Bad_Name", match="invalid instance name 'Bad_Name'")

    def test_nonsense_size(self) -> None:
        _fails("launch", "minimal", "vm1", "--memory", "lots", match="invalid memory size 'lots'")
        _fails("launch", "minimal", "vm1", "--memory", "12XB", match="unknown unit 'XB'")

    def test_too_small_memory(self) -> None:
        _fails("launch", "minimal", "vm1", "--memory", "1MiB", match="at least 64MiB")

    def test_more_vcpus_than_host(self) -> None:
        n = len(os.sched_getaffinity(0)) + 1
        _fails("launch", "minimal", "vm1", "--vcpus", str(n), match="this host has only")

    def test_zero_vcpus(self) -> None:
        _fails("launch", "minimal", "vm1", "--vcpus", "0", match="at least 1")

    def test_more_memory_than_host(self) -> None:
        _fails("launch", "minimal", "vm1", "--memory", "4TiB", match="this host has only")

    def test_unknown_accel(self) -> None:
        _fails("launch", "minimal", "vm1", "--accel", "xen", match="allowed: auto, kvm, tcg")

    def test_operations_on_missing_instance(self) -> None:
        for verb in ("start", "stop", "pause", "resume", "info", "delete"):
            _fails(verb, "ghost", match="instance 'ghost' not found")
        _fails("exec", "ghost", "--", "true", match="instance 'ghost' not found")

    def test_vm_gets_no_shared_folder(self) -> None:
        _fails("launch", "minimal", "vm1", "--mount", "/var/tmp:/mnt",
               match="the qemu engine cannot share host directories")

    def test_bad_format(self) -> None:
        _fails("list", "--format", "xml", match="'xml' is not one of 'table'")


def test_image_hash_mismatch_refuses_launch(popek_home: Path, minimal_image: str,
                                            tmp_path_factory: pytest.TempPathFactory) -> None:
    """A flipped byte in the kernel: launch refused before QEMU starts, nothing created."""
    other = Path(str(tmp_path_factory.mktemp("tampered")))
    shutil.copytree(popek_home / "images", other / "images")
    kernel = other / "images" / "minimal" / "vmlinuz"
    data = bytearray(kernel.read_bytes())
    data[len(data) // 2] ^= 0xFF
    kernel.write_bytes(bytes(data))
    env = dict(os.environ, POPEK_HOME=str(other))
    # the copy's signature is by the session's key: sign it with this home's own key, so
    # that the signature holds and the flipped byte is what the launch trips on
    popek("image", "sign", "minimal", env=env)
    err = _fails("launch", "minimal", "vm1", match="sha256", env=env)
    assert "vmlinuz" in err
    assert not (other / "instances" / "default" / "vm1").exists()
    assert processes_mentioning(str(other)) == []
    listing = popek("list", "--format", "json", env=env)
    assert listing.stdout.strip() == "[]"
