"""Attacks from inside an application sandbox on the host: each must fail.

The threat: an application (a document viewer, a build tool, a downloaded
binary) that turns hostile.  ``popek sandbox run`` gives it /usr, a small /etc,
private /tmp and home, its own namespaces, no capabilities, a seccomp filter,
and only ``nobody``'s rights on the host.  Each test takes the attacker's seat
inside and shows that the host does not give way.
"""

from __future__ import annotations

import json
import os
import secrets
import select
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from framework import POPEK, popek, wait_for

PY = "/usr/bin/python3"
EPERM = "Operation not permitted"


def sandbox(*args: str) -> tuple[int, str, str]:
    """Run ``popek sandbox run ARGS``; return (exit code, stdout, stderr)."""
    proc = popek("sandbox", "run", *args, check=False, timeout=60)
    return proc.returncode, proc.stdout, proc.stderr


def pids_of(comm: str, arg: str) -> list[int]:
    """Return host pids whose command is ``comm`` and whose arguments include ``arg``."""
    found = []
    for d in Path("/proc").iterdir():
        try:
            if (d.name.isdigit() and (d / "comm").read_text().strip() == comm
                    and arg.encode() in (d / "cmdline").read_bytes().split(b"\0")):
                found.append(int(d.name))
        except OSError:
            pass
    return found


@pytest.fixture
def ssh_key(popek_home: Path) -> Iterator[Path]:
    """root's ~/.ssh/id_ed25519: a fake one for the test when there is none."""
    key = Path("/root/.ssh/id_ed25519")
    created_dir = not key.parent.exists()
    created = not key.exists()
    if created:
        key.parent.mkdir(mode=0o700, exist_ok=True)
        key.write_text("-----BEGIN OPENSSH PRIVATE KEY----- popek test fake\n")
        key.chmod(0o600)
    yield key
    if created:
        key.unlink()
    if created_dir:
        key.parent.rmdir()


def test_read_root_ssh_key(ssh_key: Path) -> None:
    code, out, err = sandbox("--", "sh", "-c", f"cat {ssh_key}; ls -a /root")
    assert code != 0 and "PRIVATE KEY" not in out
    assert "No such file or directory" in err
    # binding it in on purpose gives the directory as it is (root's, 0700): popek reaches
    # it for the sandbox (issue 13.7: --rw ~/work as root), the application cannot read it
    code, out, err = sandbox("--ro", str(ssh_key.parent), "--", "cat", str(ssh_key))
    assert code != 0 and "PRIVATE KEY" not in out and "Permission denied" in err


def test_read_etc_shadow(popek_home: Path) -> None:
    code, out, err = sandbox("--", "sh", "-c", "cat /etc/shadow; ls /etc")
    assert "No such file or directory" in err
    assert "shadow" not in out and "root:" not in out


def test_passwd_shows_no_host_users(popek_home: Path) -> None:
    code, out, _ = sandbox("--", "cat", "/etc/passwd")
    assert code == 0
    assert [line.split(":")[0] for line in out.splitlines()] == ["root", "sandbox", "nobody"]


@pytest.mark.parametrize("target", ["/usr/popek-escape", "/etc/popek-escape", "/popek-escape",
                                    "/usr/bin/popek-escape", "/proc/sys/kernel/hostname"])
def test_write_host_system_paths(popek_home: Path, target: str) -> None:
    code, _, err = sandbox("--", "sh", "-c", f"echo pwned > {target}")
    assert code != 0 and err
    if not target.startswith("/proc"):
        assert not Path(target).exists()
    assert Path("/proc/sys/kernel/hostname").read_text().strip() != "pwned"


def test_write_host_tmp_and_home(popek_home: Path) -> None:
    marker = f"popek-escape-{secrets.token_hex(4)}"
    code, _, err = sandbox("--", "sh", "-c",
                           f"echo x > /tmp/{marker} && echo x > $HOME/{marker} && "
                           f"echo x > /var/tmp/{marker}")
    assert code != 0  # /tmp and home are private tmpfs; /var/tmp does not exist
    for host_dir in ("/tmp", "/root", "/var/tmp", "/home/sandbox"):
        assert not (Path(host_dir) / marker).exists()


def _listener(address: object, family: int = socket.AF_INET,
              ) -> tuple[socket.socket, list[bytes], threading.Event]:
    """A listening socket whose connections' first bytes land in the returned list."""
    server = socket.socket(family, socket.SOCK_STREAM)
    server.bind(address)
    server.listen(4)
    hits: list[bytes] = []
    arrived = threading.Event()

    def accept() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            hits.append(conn.recv(64))
            conn.close()
            arrived.set()

    threading.Thread(target=accept, daemon=True).start()
    return server, hits, arrived


def _tcp_probe(host: str, port: int) -> str:
    return (f"import socket; s = socket.create_connection(('{host}', {port}), timeout=5); "
            "s.sendall(b'hello-from-sandbox'); s.close()")


def test_connect_to_host_without_net(popek_home: Path) -> None:
    server, hits, _ = _listener(("127.0.0.1", 0))
    port = server.getsockname()[1]
    try:
        code, out, err = sandbox("--", "sh", "-c",
                                 f"cat /proc/net/dev; {PY} -c \"{_tcp_probe('127.0.0.1', port)}\"")
        assert code != 0 and "Connection refused" in err
        interfaces = [line.split(":")[0].strip() for line in out.splitlines()[2:]]
        assert interfaces == ["lo"]
        # with --net neither the sandbox's 127.0.0.1 (its own lo) nor the user-mode
        # gateway leads to the host's loopback (slirp4netns --disable-host-loopback
        # answers the gateway with "unreachable")
        for target, why in (("127.0.0.1", "Connection refused"),
                            ("10.0.2.2", "Network is unreachable")):
            code, _, err = sandbox("--net", "--", PY, "-c", _tcp_probe(target, port))
            assert code != 0 and why in err, (target, err)
        assert hits == []
    finally:
        server.close()


@pytest.fixture
def peer_netns() -> Iterator[tuple[str, str]]:
    """A network namespace of the test's own, routed from the host over a veth pair.

    Returns (namespace, its address): the only place the sandboxes' outbound
    traffic goes to (never beyond this host).
    """
    ns, host_if = f"h4peer{os.getpid() % 100000}", f"h4veth{os.getpid() % 100000}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        for cmd in (["ip", "link", "add", host_if, "type", "veth", "peer", "name", "p0",
                     "netns", ns],
                    ["ip", "addr", "add", "10.254.44.1/30", "dev", host_if],
                    ["ip", "link", "set", host_if, "up"],
                    ["ip", "-n", ns, "addr", "add", "10.254.44.2/30", "dev", "p0"],
                    ["ip", "-n", ns, "link", "set", "p0", "up"],
                    ["ip", "-n", ns, "link", "set", "lo", "up"]):
            subprocess.run(cmd, check=True)
        yield ns, "10.254.44.2"
    finally:
        subprocess.run(["ip", "link", "del", host_if], check=False, capture_output=True)
        subprocess.run(["ip", "netns", "delete", ns], check=False)


#: a TCP server for one connection in the peer namespace: prints its port, then what it got
PEER_SERVER = ("import socket, sys\n"
               "s = socket.socket(); s.bind(('10.254.44.2', 0)); s.listen(1)\n"
               "print(s.getsockname()[1], flush=True)\n"
               "c, _ = s.accept(); print(c.recv(64).decode(), flush=True)\n")


def test_net_reaches_out_but_not_host_abstract_sockets(popek_home: Path,
                                                       peer_netns: tuple[str, str]) -> None:
    """``--net``: TCP out works; the host's abstract Unix sockets (X11, D-Bus) are out of reach.

    Abstract sockets belong to the network namespace and have no permission
    bits: sharing the host's namespace hands them over.  The control is the
    same sandbox sharing the host's namespace (what ``--net`` did before):
    there the same probe reaches the listener.
    """
    ns, peer = peer_netns
    server = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", PEER_SERVER],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        code, _, err = sandbox("--net", "--", PY, "-c", _tcp_probe(peer, port))
        assert code == 0, err
        assert server.stdout.readline().strip() == "hello-from-sandbox"
    finally:
        server.kill()
        server.wait()
    name = f"popek-test-x11-{secrets.token_hex(4)}"
    listener, hits, arrived = _listener(f"\0{name}", socket.AF_UNIX)
    probe = (f"import socket; s = socket.socket(socket.AF_UNIX); s.connect('\\0{name}'); "
             "s.sendall(b'hello-from-sandbox'); s.close()")
    try:
        code, _, err = sandbox("--net", "--", PY, "-c", probe)
        assert code != 0 and "ConnectionRefusedError" in err, err  # no such name in its netns
        assert hits == []
        control = subprocess.run([sys.executable, "-c", SHARED_NET, PY, "-c", probe],
                                 capture_output=True, text=True, timeout=60, check=False)
        assert control.returncode == 0, control.stderr
        assert arrived.wait(5) and hits == [b"hello-from-sandbox"]
    finally:
        listener.close()


#: ``popek sandbox run`` as before user-mode networking: network on through the
#: host's namespace (bwrap ``--share-net``); everything else unchanged
SHARED_NET = (
    "import sys\n"
    "from popek.engines.sandbox import argv, profile, runner\n"
    "build = argv.build_bwrap_argv\n"
    "def shared(*args, **kw):\n"
    "    out = build(*args, **kw)\n"
    "    at = out.index('--unshare-all') + 1\n"
    "    return [*out[:at], '--share-net', *out[at:]]\n"
    "argv.build_bwrap_argv = shared\n"
    "sys.exit(runner.run('default', profile.RunOptions(), sys.argv[1:]))\n")


def _memory_cgroup(pid: int) -> Path:
    """The memory cgroup directory of ``pid`` (v1 hierarchy or v2)."""
    lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    v1 = [ln.split(":", 2)[2] for ln in lines if ":memory:" in ln]
    if v1:
        return Path("/sys/fs/cgroup/memory") / v1[0].lstrip("/")
    return Path("/sys/fs/cgroup") / lines[0].split(":", 2)[2].lstrip("/")


def test_tmpfs_pages_count_against_the_memory_limit(popek_home: Path) -> None:
    """The sandbox's tmpfs are charged to its own memory cgroup, whose limit is the profile's.

    The sandbox writes 24 MiB into /tmp, says so, and waits: the test
    finds it on the host and reads its cgroup.  Before, there was no cgroup:
    the pages were charged to whatever cgroup the caller was in.
    """
    marker = f"popek-fill-{secrets.token_hex(4)}"
    script = "head -c 25165824 /dev/zero > /tmp/fill && echo filled && read line"
    proc = subprocess.Popen([*POPEK, "sandbox", "run", "--memory", "64MiB", "--", "sh", "-c",
                             script, marker], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout is not None and proc.stdin is not None
        assert proc.stdout.readline().strip() == "filled"
        pids = pids_of("sh", marker)
        assert len(pids) == 1
        cg = _memory_cgroup(pids[0])
        assert cg.name.startswith("sandbox-") and cg.parent.name == "popek", cg
        v1 = (cg / "memory.limit_in_bytes").exists()
        limit = int((cg / ("memory.limit_in_bytes" if v1 else "memory.max")).read_text())
        used = int((cg / ("memory.usage_in_bytes" if v1 else "memory.current")).read_text())
        assert limit == 64 << 20
        assert used >= 24 << 20, used
        proc.stdin.write("\n")
        proc.stdin.close()
        assert proc.wait(30) == 0
    finally:
        proc.kill()
        proc.wait()
    assert not cg.exists()  # removed with the sandbox


def test_fill_tmpfs_past_the_memory_limit(popek_home: Path) -> None:
    """Writing more than the limit across /tmp, the home and /dev/shm fails inside.

    64 MiB limit, 40 MiB written to each of the three (120 MiB): the tmpfs
    share 3/4 of the limit, so the writes stop with ENOSPC and 48 MiB are
    stored.  Before, each was sized to the whole limit and all 120 MiB fit.
    """
    script = ("for d in /tmp $HOME /dev/shm; do head -c 41943040 /dev/zero > $d/fill; done; "
              "cat /tmp/fill $HOME/fill /dev/shm/fill | wc -c")
    code, out, err = sandbox("--memory", "64MiB", "--", "sh", "-c", script)
    assert "No space left on device" in err, err
    assert code == 0 and int(out.split()[-1]) == 48 << 20


def test_tmpfs_and_memory_together_past_the_limit(popek_home: Path) -> None:
    """Files in /tmp and the application's memory share one limit: past it, the OOM killer.

    256 MiB limit: 120 MiB in /tmp, then the application touches 150 MiB
    (its address space, 180 MiB, is under ``RLIMIT_AS``): the sandbox's cgroup
    kills it.  Before, the tmpfs pages were charged to no limit and it lived.
    """
    script = (f"head -c 125829120 /dev/zero > /tmp/fill && {PY} -c "
              "\"b = bytearray(b'x') * (150 << 20); print('survived')\"")
    code, out, _ = sandbox("--memory", "256MiB", "--", "sh", "-c", script)
    assert code == 128 + signal.SIGKILL and "survived" not in out


def test_nested_user_namespace(popek_home: Path) -> None:
    code, _, err = sandbox("--", "unshare", "-r", "id")
    assert code != 0 and EPERM in err


#: Each denied call as a probe that a plain unprivileged process (``nobody``, no
#: capability) is allowed to make, or that the kernel refuses for another reason
#: than privilege, so that ``EPERM`` can only be the seccomp filter's verdict.
#: The comment gives what the kernel answers without the filter (Linux 6.18).
PROBES: dict[str, str] = {
    # the path lookup comes before the privilege check: ENOENT
    "mount": "sc('mount', None, b'/nonexistent-popek', None, 0, None)",
    # KEYCTL_GET_KEYRING_ID of the user's own keyring: ok for anyone
    "keyctl": "sc('keyctl', 0, -4, 0)",
    "add_key": "sc('add_key', b'user', b'k', b'v', 1, -4)",  # ok for anyone
    # a new user namespace: ENOSPC (bwrap --disable-userns sets the sandbox's limit to 0)
    "clone_newuser": "sc('clone', 0x10000000 | 17, 0, 0, 0, 0)",
    "unshare_newuser": "sc('unshare', 0x10000000)",  # the same through unshare: ENOSPC
    "setns": "sc('setns', 0, 0)",  # stdin is no namespace: EINVAL
    "bpf": "sc('bpf', 999, None, 0)",  # an unknown command: EINVAL
    "ptrace": "sc('ptrace', 0, 0, 0, 0)",  # PTRACE_TRACEME: ok for anyone
    # the "shocker" escape; the handle is read before the privilege check: EFAULT
    "open_by_handle_at": "sc('open_by_handle_at', -1, None, 0)",
    "io_uring_setup": "sc('io_uring_setup', 1, None)",  # EFAULT for the missing params
    # SYSLOG_ACTION_SIZE_BUFFER: ok for anyone while kernel.dmesg_restrict is 0
    "syslog": "sc('syslog', 10, None, 0)",
}

PROBE_SCRIPT = (
    "import ctypes, errno, json, os\n"
    "libc = ctypes.CDLL(None, use_errno=True)\n"
    "NR = {'mount': 165, 'keyctl': 250, 'add_key': 248, 'clone': 56, 'setns': 308,\n"
    "      'bpf': 321, 'ptrace': 101, 'open_by_handle_at': 304, 'unshare': 272,\n"
    "      'io_uring_setup': 425, 'syslog': 103}\n"
    "def sc(n, *a):\n"
    "    r = libc.syscall(NR[n], *a)\n"
    "    if r == 0 and n == 'clone': os._exit(0)\n"
    "    return 'ok' if r >= 0 else errno.errorcode[ctypes.get_errno()]\n"
    "status = dict(l.split(':', 1) for l in open('/proc/self/status').read().splitlines())\n"
    "out = {k: status[k].strip() for k in ('Uid', 'CapEff', 'NoNewPrivs', 'Seccomp')}\n"
    + "".join(f"out[{name!r}] = {call}\n" for name, call in PROBES.items())
    + "print(json.dumps(out))\n")

#: ``popek sandbox run`` with the seccomp filter switched off: the runner
#: unchanged, but given a filter that allows every call in place of popek's
#: (bwrap, namespaces, uid, capabilities, no_new_privs all stay as they are)
UNFILTERED = (
    "import sys\n"
    "from popek.engines import seccomp\n"
    "seccomp.bpf_program = lambda extra=(): seccomp._ret(seccomp.SECCOMP_RET_ALLOW)\n"
    "from popek.engines.sandbox import profile, runner\n"
    "sys.exit(runner.run('default', profile.RunOptions(), sys.argv[1:]))\n")


@pytest.fixture(scope="module")
def probes(popek_home: Path) -> Iterator[tuple[dict[str, str], dict[str, str]]]:
    """Run the probes in a sandbox and, as the control, in one without the filter.

    kernel.dmesg_restrict is 0 while they run (an unprivileged process may then
    ask the kernel log's size), and restored after.
    """
    restrict = Path("/proc/sys/kernel/dmesg_restrict")
    before = restrict.read_text()
    restrict.write_text("0")
    try:
        code, out, err = sandbox("--", PY, "-c", PROBE_SCRIPT)
        assert code == 0, err
        control = subprocess.run([sys.executable, "-c", UNFILTERED, PY, "-c", PROBE_SCRIPT],
                                 capture_output=True, text=True, timeout=60, check=False)
        assert control.returncode == 0, control.stderr
    finally:
        restrict.write_text(before)
    yield json.loads(out), json.loads(control.stdout)


def test_probes_run_confined(probes: tuple[dict[str, str], dict[str, str]]) -> None:
    """Both runs are the same sandbox (uid, capabilities, no_new_privs); only the filter differs.

    ``Seccomp: 2`` (filter mode) inside both: the control's filter allows everything.
    """
    filtered, control = probes
    for run in (filtered, control):
        assert run["Uid"].split() == ["1000"] * 4
        assert int(run["CapEff"], 16) == 0
        assert run["NoNewPrivs"] == "1"
        assert run["Seccomp"] == "2"


@pytest.mark.parametrize("name", PROBES)
def test_denied_syscall(probes: tuple[dict[str, str], dict[str, str]], name: str) -> None:
    """The seccomp filter refuses the call with EPERM before the kernel looks at it.

    The control is the same sandbox with an allow-all filter in place of
    popek's: there the same call succeeds or gets another errno from the
    kernel (ENOENT, EINVAL, EFAULT, ENOSPC), so neither ``nobody``'s rights nor
    the missing capabilities explain the EPERM.  Disable the control (drop the
    name from ``seccomp.DENIED`` or ``ARG_RULES``) and the sandboxed call gets
    the control's answer: this test fails.
    """
    filtered, control = probes
    assert filtered[name] == "EPERM", f"{name}: {filtered[name]} (without the filter: " \
                                      f"{control[name]})"
    assert control[name] != "EPERM", f"{name}: the probe is refused even without the filter"


def test_see_host_processes(popek_home: Path) -> None:
    code, out, _ = sandbox("--", "sh", "-c", "ps -e -o pid=,comm=; cat /proc/[0-9]*/cmdline")
    assert code == 0
    comms = {line.split()[1] for line in out.splitlines() if line.strip()[:1].isdigit()}
    assert comms <= {"bwrap", "sh", "ps", "cat"}
    assert "pytest" not in out and "systemd" not in out and "init" not in out


def test_sandbox_holds_no_host_privilege(popek_home: Path) -> None:
    marker = str(4000 + secrets.randbelow(1000))
    proc = subprocess.Popen([*POPEK, "sandbox", "run", "--", "sleep", marker])
    try:
        wait_for(lambda: pids_of("sleep", marker), 10, "the sandboxed sleep to start")
        pids = pids_of("sleep", marker)
        status = dict(line.split(":", 1) for line in
                      Path(f"/proc/{pids[0]}/status").read_text().splitlines())
        assert status["Uid"].split() == ["65534"] * 4  # nobody on the host, not root
        assert status["Groups"].strip() == ""
        assert int(status["CapEff"], 16) == int(status["CapPrm"], 16) == 0
        assert status["NoNewPrivs"].strip() == "1" and status["Seccomp"].strip() == "2"
    finally:
        proc.kill()
        proc.wait()


def test_sandbox_outliving_its_parent(popek_home: Path) -> None:
    marker = str(5000 + secrets.randbelow(1000))
    proc = subprocess.Popen([*POPEK, "sandbox", "run", "--", "sleep", marker])
    wait_for(lambda: pids_of("sleep", marker), 10, "the sandboxed sleep to start")
    pidfd = os.pidfd_open(pids_of("sleep", marker)[0])
    try:
        os.kill(proc.pid, signal.SIGKILL)  # the popek CLI dies without cleaning up
        proc.wait()
        # a pidfd becomes readable when its process exits: wait for that event
        assert select.select([pidfd], [], [], 5)[0] == [pidfd], "the sandbox outlived popek"
    finally:
        os.close(pidfd)
    assert pids_of("sleep", marker) == []
