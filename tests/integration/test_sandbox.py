"""``popek sandbox run``: one application in bubblewrap, through the real CLI (root)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from framework import popek

PY = "/usr/bin/python3"  # the host's python, visible in the sandbox through /usr


def sandbox(*args: str, stdin: bytes | None = None,
            env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """Run ``popek sandbox run ARGS`` and return (exit code, stdout, stderr)."""
    proc = popek("sandbox", "run", *args, check=False, timeout=60, stdin=stdin, env=env)
    return proc.returncode, proc.stdout, proc.stderr


@pytest.fixture
def shared_dir(popek_home: Path) -> Iterator[Path]:
    """A host directory that the sandbox's host user (nobody) may write."""
    path = Path(tempfile.mkdtemp(prefix="popek-sbx-", dir="/var/tmp"))
    path.chmod(0o777)
    yield path
    shutil.rmtree(path)


def test_exit_code_passes_through(popek_home: Path) -> None:
    assert sandbox("--", "sh", "-c", "exit 7")[0] == 7
    assert sandbox("--", "sh", "-c", "kill -9 $$")[0] == 128 + 9


def test_stdio_passes_through(popek_home: Path) -> None:
    code, out, err = sandbox("--", "sh", "-c", "tr a-z A-Z; echo to-stderr >&2",
                             stdin=b"hello sandbox\n")
    assert (code, out, err) == (0, "HELLO SANDBOX\n", "to-stderr\n")


def test_rw_dir_is_writable(shared_dir: Path) -> None:
    code, _, err = sandbox("--rw", str(shared_dir), "--", "sh", "-c",
                           f"echo written > {shared_dir}/out.txt")
    assert code == 0, err
    out = shared_dir / "out.txt"
    assert out.read_text() == "written\n"
    assert out.stat().st_uid == 65534  # the host sees nobody, never root


def test_ro_dir_is_readable_not_writable(shared_dir: Path) -> None:
    (shared_dir / "in.txt").write_text("input\n")
    code, out, err = sandbox("--ro", str(shared_dir), "--", "sh", "-c",
                             f"cat {shared_dir}/in.txt; touch {shared_dir}/new")
    assert code != 0 and out == "input\n"
    assert "Read-only file system" in err
    assert not (shared_dir / "new").exists()


def test_environment_is_clean(popek_home: Path) -> None:
    env = {**os.environ, "POPEK_TEST_SECRET": "hunter2", "TERM": "dumb", "LANG": "C.UTF-8"}
    code, out, _ = sandbox("--", PY, "-c", "import os, json; print(json.dumps(dict(os.environ)))",
                           env=env)
    assert code == 0
    seen = json.loads(out)
    assert "hunter2" not in out and "POPEK" not in out
    assert seen == {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/home/sandbox",
                    "USER": "sandbox", "TERM": "dumb", "LANG": "C.UTF-8",
                    "PWD": "/home/sandbox"}  # PWD: set by bwrap --chdir


def test_identity_inside(popek_home: Path) -> None:
    code, out, _ = sandbox("--", "sh", "-c", "hostname; id -un; id -u; pwd")
    assert (code, out.split()) == (0, ["sandbox", "sandbox", "1000", "/home/sandbox"])


def test_own_pid_namespace(popek_home: Path) -> None:
    code, out, _ = sandbox("--", "sh", "-c", "echo $$; ls -d /proc/[0-9]*")
    lines = out.split()
    assert code == 0 and int(lines[0]) <= 3
    assert len(lines[1:]) <= 4  # bwrap's init, sh, ls


def test_memory_limit_stops_big_allocation(popek_home: Path) -> None:
    code, _, err = sandbox("--memory", "128MiB", "--", PY, "-c", "b = bytearray(512 << 20)")
    assert code == 1 and "MemoryError" in err
    assert sandbox("--memory", "128MiB", "--", PY, "-c", "b = bytearray(16 << 20)")[0] == 0


def test_timeout_kills_the_application(popek_home: Path) -> None:
    code, _, err = sandbox("--timeout", "0.5", "--", "sleep", "30")
    assert code == 124 and "--timeout 0.5" in err


def test_profiles_listing(popek_home: Path) -> None:
    rows = json.loads(popek("sandbox", "profiles", "--format", "json").stdout)
    by_name = {r["name"]: r for r in rows}
    assert by_name["default"]["network"] is False and by_name["net"]["network"] is True
    assert (popek_home / "profiles" / "default.toml").exists()
    table = popek("sandbox", "profiles").stdout
    assert "default" in table and "net" in table


def test_custom_profile_is_used(popek_home: Path, shared_dir: Path) -> None:
    (shared_dir / "data").write_text("from profile\n")
    (popek_home / "profiles" / "tool.toml").write_text(
        f'ro = ["{shared_dir}"]\n[env]\nGREETING = "hi"\n[limits]\nnofile = 64\n')
    try:
        code, out, _ = sandbox("--profile", "tool", "--", "sh", "-c",
                               f'echo $GREETING; cat {shared_dir}/data; ulimit -n')
        assert (code, out) == (0, "hi\nfrom profile\n64\n")
    finally:
        (popek_home / "profiles" / "tool.toml").unlink()


def test_bad_input_is_refused_clearly(popek_home: Path) -> None:
    code, _, err = sandbox("--profile", "nope", "--", "true")
    assert code == 8 and "unknown sandbox profile 'nope'; available: default, net" in err
    code, _, err = sandbox("--ro", "/proc/1", "--", "true")
    assert code == 2 and "is under /proc" in err
    code, _, err = sandbox("--memory", "lots", "--", "true")
    assert code == 2 and "invalid --memory size 'lots'" in err
    (popek_home / "profiles" / "broken.toml").write_text("network = yes\n")
    try:
        code, _, err = sandbox("--profile", "broken", "--", "true")
        assert code == 2 and "profile 'broken'" in err and "line 1" in err
    finally:
        (popek_home / "profiles" / "broken.toml").unlink()
