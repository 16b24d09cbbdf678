"""Helpers shared by the integration and security suites: running the real CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
POPEK = [sys.executable, "-m", "popek"]


def popek(*args: str, check: bool = True, stdin: bytes | None = None,
          env: dict[str, str] | None = None,
          timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run the real ``popek`` CLI; fail the test with its output when ``check`` and it fails."""
    proc = subprocess.run([*POPEK, *args], input=stdin.decode() if stdin is not None else "",
                          capture_output=True, text=True, env=env or os.environ.copy(),
                          timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"popek {' '.join(args)} failed ({proc.returncode}):\n"
                             f"{proc.stdout}\n{proc.stderr}")
    return proc


def popek_json(*args: str) -> Any:
    """Run a popek command with ``--format json`` and return the parsed output."""
    return json.loads(popek(*args, "--format", "json").stdout)


def instance(name: str) -> dict[str, Any]:
    """Return the ``popek list`` entry of ``name``."""
    for entry in popek_json("list"):
        if entry["name"] == name:
            return dict(entry)
    raise AssertionError(f"instance {name} not in popek list")


def qemu_pids() -> list[int]:
    """Return the pids of every QEMU process on this host."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if (d / "comm").read_text().startswith("qemu-system"):
                    pids.append(int(d.name))
            except OSError:
                pass
    return pids


def processes_mentioning(text: str) -> list[int]:
    """Return pids whose command line contains ``text``."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if text.encode() in (d / "cmdline").read_bytes():
                    pids.append(int(d.name))
            except OSError:
                pass
    return pids


def container_cgroup(name: str, controller: str) -> Path:
    """Return the host cgroup directory of container ``name`` for ``controller``."""
    root = Path("/sys/fs/cgroup")
    from popek import paths

    rel = f"popek/{paths.home_id()}-default-{name}"
    if (root / "cgroup.controllers").exists() and not (root / "memory").is_dir():
        return root / rel
    return root / controller / rel


def wait_for(check: Any, timeout: float, what: str) -> None:
    """Poll ``check()`` until true; fail the test naming ``what`` after ``timeout`` s."""
    import time

    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)


def tcp_reach(name: str, ip: str, port: int) -> bool:
    """Whether instance ``name`` can open a TCP connection to ``ip:port``.

    Uses busybox nc (containers have no CAP_NET_RAW for ping): exit 0 when the
    peer closed, 143 when ``timeout`` ended a connection that stayed open.
    """
    proc = popek("exec", name, "--", "sh", "-c",
                 f"timeout 4 nc -w 2 {ip} {port} </dev/null >/dev/null 2>&1; echo rc=$?",
                 check=False)
    return proc.stdout.strip() in ("rc=0", "rc=143")


#: The properties of a host that may excuse a security test from running, each
#: documented in docs/THREAT_MODEL.md ("When a security test may skip").  Any
#: other skip in tests/security fails the run (tests/conftest.py).
HOST_PROPERTIES = ("cpu-count", "cgroup-version", "no-hardware-kvm")
HOST_SKIP_PREFIX = "host property "


def host_skip(prop: str, detail: str) -> None:
    """Skip the calling test because the host lacks ``prop``, one of HOST_PROPERTIES."""
    import pytest

    if prop not in HOST_PROPERTIES:
        raise ValueError(f"{prop!r} is not a documented host property: {HOST_PROPERTIES}")
    pytest.skip(f"{HOST_SKIP_PREFIX}{prop}: {detail}")


def is_host_skip(reason: str) -> bool:
    """Whether a skip's reason names a documented host property (see host_skip)."""
    return any(reason.startswith(f"{HOST_SKIP_PREFIX}{p}: ") for p in HOST_PROPERTIES)


def require_root_and_tools(*tools: str) -> None:
    """Fail the calling test module unless it runs as root and every tool is installed.

    Missing tools are set-up's job (scripts/setup.sh installs them all), never a
    reason to skip a test: a skip here would hide a security promise unchecked.
    """
    import shutil

    import pytest

    if os.geteuid() != 0:
        pytest.fail("these tests need root: run them as root, as `make test` does",
                    pytrace=False)
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.fail(f"missing tools: {', '.join(missing)}; `make setup` installs them",
                    pytrace=False)


class Home:
    """A private POPEK_HOME with its own trust store, policy and audit log.

    Trust tests change host-wide state (keys, the policy in force, the audit
    log); they run in a home of their own so the rest of the session is not
    touched.  ``images`` are copied from the session home, unsigned: each
    test module signs them with keys of its own home.
    """

    def __init__(self, session_home: Path, images: tuple[str, ...] = ("minimal",)) -> None:
        import shutil
        import tempfile

        self.path = Path(tempfile.mkdtemp(prefix="popek-trust-", dir="/var/tmp"))
        self.path.chmod(0o755)
        for name in images:
            dst = self.path / "images" / name
            shutil.copytree(session_home / "images" / name, dst)
            (dst / "manifest.sig").unlink(missing_ok=True)
        self.env = {**os.environ, "POPEK_HOME": str(self.path)}

    def popek(self, *args: str, check: bool = True,
              stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
        """Run the CLI in this home."""
        return popek(*args, check=check, stdin=stdin, env=self.env)

    def instances(self) -> list[str]:
        """Names of the instances of this home."""
        return [i["name"] for i in json.loads(self.popek("list", "--format", "json").stdout)]

    def close(self) -> None:
        """Delete every instance and network, then the home."""
        import shutil

        for name in self.instances():
            self.popek("delete", "--force", name, check=False)
        nets = self.popek("network", "list", "--format", "json", check=False)
        for net in json.loads(nets.stdout or "[]") if nets.returncode == 0 else []:
            self.popek("network", "delete", "--force", net["name"], check=False)
        shutil.rmtree(self.path, ignore_errors=True)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for a server a test starts)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
