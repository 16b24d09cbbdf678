"""Attacks from inside a system container: each must fail, for the reason the control gives.

The attacker is root inside a popek container.  The container shares one
host directory (``--mount``) through which the tests hand it a static attack
tool built from tests/security/attacks/escape.c.  The tool prints the system
call it issued and the errno the kernel returned for it, so each test shows
that the attack was really attempted and checks the exact refusal, not only a
non-zero exit.  Where the same call can be made safely on the host (as root,
in a throwaway mount namespace or directory), the test makes it there too: the
positive control, where the call succeeds or fails for another reason than the
container's confinement.

gcc is installed by set-up (scripts/setup.sh): without it this module fails,
it never skips.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from framework import (
    container_cgroup,
    instance,
    popek,
    popek_json,
    require_root_and_tools,
    wait_for,
)

require_root_and_tools("gcc", "unshare")

CT = "attacker"
NEIGHBOUR = "neighbour"
UNFILTERED_CT = "attacker-unfiltered"
ATTACKS = Path(__file__).parent / "attacks" / "escape.c"


@pytest.fixture(scope="module")
def share() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="popek-share-", dir="/var/tmp"))
    d.chmod(0o777)  # writable by the container's mapped root
    subprocess.run(["gcc", "-static", "-O2", "-o", str(d / "escape"), str(ATTACKS)], check=True)
    _module_file(d / "mod.ko")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def ct(minimal_image: str, share: Path, channel_label: str) -> Iterator[dict[str, object]]:
    # sharing a host directory is a host channel: the policy must grant it to the label
    popek("launch", minimal_image, CT, "--container", "--memory", "64MiB", "--pids", "64",
          "--mount", f"{share}:/share", "--label", channel_label)
    yield popek_json("info", CT)
    popek("delete", "--force", CT, check=False)


@pytest.fixture(scope="module")
def neighbour(minimal_image: str) -> Iterator[str]:
    popek("launch", minimal_image, NEIGHBOUR, "--container", "--memory", "64MiB")
    yield NEIGHBOUR
    popek("delete", "--force", NEIGHBOUR, check=False)


#: ``popek launch`` in this process with the container's seccomp filter switched
#: off (an allow-all profile in place of popek's deny list): capabilities, user
#: namespace, masked paths and every other control stay as popek sets them
UNFILTERED = (
    "import sys\n"
    "from popek.engines.container import spec\n"
    "spec.oci_profile = lambda *a, **k: {'defaultAction': 'SCMP_ACT_ALLOW'}\n"
    "from popek.cli.entry import main\n"
    "main(sys.argv[1:])\n")


@pytest.fixture(scope="module")
def unfiltered(minimal_image: str, share: Path, channel_label: str) -> Iterator[str]:
    """A container like ``attacker`` whose seccomp filter allows every call: the control off."""
    env = {**os.environ, "POPEK_CLI_SERVER": "off"}
    proc = subprocess.run([sys.executable, "-c", UNFILTERED, "launch", minimal_image,
                           UNFILTERED_CT, "--container", "--memory", "64MiB", "--pids", "64",
                           "--mount", f"{share}:/share", "--label", channel_label],
                          capture_output=True, text=True, env=env, timeout=300, check=False)
    try:
        assert proc.returncode == 0, proc.stderr
        config = json.loads((Path(str(popek_json("info", UNFILTERED_CT)["workdir"]))
                             / "bundle" / "config.json").read_text())
        assert config["linux"]["seccomp"] == {"defaultAction": "SCMP_ACT_ALLOW"}
        yield UNFILTERED_CT
    finally:
        popek("delete", "--force", UNFILTERED_CT, check=False)


def sh(name: str, script: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return popek("exec", name, "--", "sh", "-c", script, check=False, timeout=timeout)


def attack(*args: str, name: str = CT) -> str:
    """Run the attack tool in container ``name``; return its report (``call = result``)."""
    return sh(name, "/share/escape " + " ".join(args)).stdout.strip()


def host(*args: str, share: Path, ns: str = "") -> str:
    """Run the attack tool on the host as root (the positive control); return its report.

    ``ns`` is a shell prefix run first in a throwaway mount namespace.
    """
    script = f"{ns}{share / 'escape'} {' '.join(args)}"
    proc = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                          capture_output=True, text=True, timeout=30, check=False)
    return proc.stdout.strip()


def _module_file(path: Path) -> None:
    """Write a kernel module to ``path``: a real one of this kernel, else an ELF object.

    A kernel built without module support has no ``/lib/modules/$(uname -r)``;
    there the file is a relocatable ELF object (what a ``.ko`` is) built by gcc.
    Its content does not change the verdict: the kernel checks the caller's
    right to load modules before it reads the file.
    """
    tree = Path("/lib/modules") / os.uname().release
    real = next(iter(sorted(tree.rglob("*.ko"))), None) if tree.is_dir() else None
    if real is not None:
        shutil.copyfile(real, path)
        return
    src = path.with_suffix(".c")
    src.write_text("int init_module(void) { return 0; }\n"
                   "const char modinfo[] __attribute__((section(\".modinfo\"))) = "
                   "\"license=GPL\";\n")
    subprocess.run(["gcc", "-c", "-O2", "-o", str(path), str(src)], check=True)
    src.unlink()
    assert path.read_bytes()[:4] == b"\x7fELF"


def test_host_processes_not_visible(ct: dict[str, object]) -> None:
    out = sh(CT, "ps -o pid,comm").stdout
    assert "pytest" not in out and "qemu" not in out and "python" not in out
    pids = [line.split()[0] for line in out.strip().splitlines()[1:]]
    assert "1" in pids and len(pids) < 8  # init, the shell, ps: nothing of the host
    # a host pid, by number, is not reachable either
    assert sh(CT, f"kill -0 {os.getpid()}").returncode != 0


def test_mount_fails(ct: dict[str, object], unfiltered: str, share: Path) -> None:
    """Mount a tmpfs, and remount the read-only /sys writable: EPERM, from mount(2) itself.

    Two controls refuse it: the seccomp filter (its verdict alone is shown by
    ``test_seccomp_is_the_reason``) and the capability set (no CAP_SYS_ADMIN),
    which alone still refuses it in the container without the filter, as this
    test checks.  Positive control: the same two calls of the tool, as root on
    the host in a throwaway mount namespace, succeed (the /sys there is first
    made read-only, then the tool makes it writable again).  With both controls
    off (no filter and CAP_SYS_ADMIN, as a ``--privileged`` runtime gives) the
    container's calls print ``= ok`` and this test fails.
    """
    assert attack("mount-tmpfs", "/tmp") == 'mount("none", "/tmp", "tmpfs", 0, NULL) = EPERM'
    assert attack("remount-rw", "/sys") == (
        'mount(NULL, "/sys", NULL, MS_REMOUNT|MS_BIND, NULL) = EPERM')
    sys_options = sh(CT, "grep ' /sys ' /proc/mounts").stdout.split()[3].split(",")
    assert "ro" in sys_options  # and it stayed read-only
    # without the filter the capability set alone still refuses both
    assert attack("mount-tmpfs", "/tmp", name=unfiltered).endswith(" = EPERM")
    assert attack("remount-rw", "/sys", name=unfiltered).endswith(" = EPERM")
    # busybox's mount says the same for EPERM and EACCES (the tool above told which)
    for cmd in ("mkdir -p /mnt/x && mount -t tmpfs none /mnt/x", "mount -o remount,rw /sys"):
        proc = sh(CT, cmd)
        assert (proc.returncode, proc.stderr) == (
            1, "mount: permission denied (are you root?)\n"), cmd
    # the positive control: the tool's calls work for a process allowed to make them
    assert host("mount-tmpfs", "/mnt", share=share) == (
        'mount("none", "/mnt", "tmpfs", 0, NULL) = ok')
    ro_then_rw = host("remount-rw", "/sys", share=share,
                      ns="mount -o remount,bind,ro /sys && grep -q ' /sys ro,' /proc/self/mountinfo"
                         " && ")
    assert ro_then_rw == 'mount(NULL, "/sys", NULL, MS_REMOUNT|MS_BIND, NULL) = ok'


def test_module_loading_fails(ct: dict[str, object], share: Path) -> None:
    """Load a kernel module (a real ``.ko`` where the host has one): EPERM.

    The tool calls ``init_module`` and ``finit_module`` on the module file.
    Positive control: as root on the host the same ``finit_module`` call (made
    with an unknown flag, so that nothing is loaded) gets past the permission
    check: ``EINVAL`` for the flag, or ``ENOSYS`` on a kernel built without
    module support, as this build host's is.  On such a kernel the container's
    ``EPERM`` can only come from popek's seccomp filter, since the kernel never
    gets as far as checking a capability.  With the filter off the container
    prints ``ENOSYS`` (``test_seccomp_is_the_reason`` runs it in a container
    with an allow-all filter) and this test fails; on a modular kernel the
    missing CAP_SYS_MODULE would still refuse it with EPERM.
    """
    assert attack("init-module") == 'init_module("x", 1, "") = EPERM'
    assert attack("finit-module", "/share/mod.ko") == (
        'finit_module(3 "/share/mod.ko", "", 0x0) = EPERM')
    control = host("finit-module", str(share / "mod.ko"), "0x80000000", share=share)
    assert control in (f'finit_module(3 "{share}/mod.ko", "", 0x80000000) = {e}'
                       for e in ("EINVAL", "ENOSYS")), control
    proc = sh(CT, "insmod /share/mod.ko")
    assert proc.returncode != 0
    assert "Operation not permitted" in proc.stderr, proc.stderr


MISSING = "/nonexistent-popek"


@pytest.mark.parametrize(("args", "call", "without_filter"), [
    # a kernel without module support answers ENOSYS (a modular one EPERM for lack of
    # CAP_SYS_MODULE: then the capability check is the control this shows instead)
    (("init-module",), 'init_module("x", 1, "")', ("ENOSYS",)),
    (("finit-module", "/share/mod.ko"), 'finit_module(3 "/share/mod.ko", "", 0x0)', ("ENOSYS",)),
    # on a missing path the kernel's path lookup, which comes before its privilege
    # check, answers ENOENT: an EPERM there is the filter's
    (("mount-tmpfs", MISSING), f'mount("none", "{MISSING}", "tmpfs", 0, NULL)', ("ENOENT",)),
    (("remount-rw", MISSING), f'mount(NULL, "{MISSING}", NULL, MS_REMOUNT|MS_BIND, NULL)',
     ("ENOENT",)),
    (("mknod", f"{MISSING}/mem", "c", "1", "1"),
     f'mknod("{MISSING}/mem", S_IFCHR|0600, makedev(1, 1))', ("ENOENT",)),
    (("unshare-user",), "unshare(CLONE_NEWUSER)", ("ok",)),
    (("ptrace-child",), "ptrace(PTRACE_ATTACH, child)", ("ok",)),
    (("ptrace-pid", "1"), "ptrace(PTRACE_ATTACH, 1)", ("ok",)),
])
def test_seccomp_is_the_reason(ct: dict[str, object], unfiltered: str, args: tuple[str, ...],
                               call: str, without_filter: tuple[str, ...]) -> None:
    """The EPERM of these calls is the seccomp filter's verdict, not the kernel's.

    The same tool in a container that differs only by an allow-all filter (the
    control off) gets the kernel's own answer: the call succeeds, the kernel
    has no such call (``ENOSYS``) or fails its path lookup (``ENOENT``), and
    nothing but the filter can say EPERM first.  Remove the call from
    ``seccomp.DENIED`` / ``ARG_RULES`` and ``attacker`` prints that answer too:
    this test fails.
    """
    assert attack(*args) == f"{call} = EPERM"
    answer = attack(*args, name=unfiltered)
    assert answer in (f"{call} = {a}" for a in without_filter), answer


def test_reboot_fails(ct: dict[str, object]) -> None:
    """``reboot -f`` in the container: refused, the container's init lives on.

    A successful reboot(2) in a PID namespace kills its init; the pidfd taken
    on the init beforehand would then be readable.  It is not: the init is the
    same process, not one restarted.
    """
    init = int(str(popek_json("info", CT)["pid"]))
    pidfd = os.pidfd_open(init)
    try:
        proc = sh(CT, "reboot -f; echo still-here")
        assert "still-here" in proc.stdout
        assert "Operation not permitted" in proc.stderr, proc.stderr
        assert select.select([pidfd], [], [], 0)[0] == [], "the container's init exited"
    finally:
        os.close(pidfd)
    assert instance(CT)["state"] == "running"
    assert sh(CT, "true").returncode == 0


def test_setting_the_clock_fails(ct: dict[str, object]) -> None:
    before = time.time()
    proc = sh(CT, "date -s '2001-01-01 00:00:00'")
    assert "not permitted" in proc.stderr  # busybox date reports it but exits 0
    assert sh(CT, "date +%Y").stdout.strip() != "2001"
    assert abs(time.time() - before) < 60  # the host clock did not move


@pytest.mark.parametrize(("node", "kind", "major", "minor"), [
    ("sda", "b", "8", "0"), ("kvm", "c", "10", "232"), ("mem", "c", "1", "1")])
def test_mknod_fails(ct: dict[str, object], unfiltered: str, share: Path, node: str, kind: str,
                     major: str, minor: str) -> None:
    """Make a device node for a host disk, /dev/kvm or /dev/mem: mknod(2) returns EPERM.

    The same tool makes a FIFO in the container (mknod(2) itself works there)
    and, as root on the host, the very device node (positive control, in a
    temporary directory removed at once).  Two controls refuse the device: the
    seccomp filter's ``mknod`` rule (its verdict alone: ``test_seccomp_is_the_reason``)
    and the kernel, which allows device nodes only to CAP_MKNOD in the host's
    user namespace; the second alone still refuses it in the container without
    the filter, as checked here.  With both off (a privileged container in the
    host's user namespace) the call prints ``= ok`` and this test fails.
    """
    mode = "S_IFBLK" if kind == "b" else "S_IFCHR"
    want = f'mknod("/tmp/{node}", {mode}|0600, makedev({major}, {minor}))'
    assert attack("mknod", f"/tmp/{node}", kind, major, minor) == f"{want} = EPERM"
    assert attack("mknod", f"/tmp/{node}", kind, major, minor, name=unfiltered) == (
        f"{want} = EPERM")
    assert sh(CT, f"test -e /tmp/{node}").returncode != 0
    proc = sh(CT, f"mknod /tmp/{node} {kind} {major} {minor}")
    assert proc.returncode != 0 and "Operation not permitted" in proc.stderr, proc.stderr
    assert attack("mknod", "/tmp/fifo", "p", "0", "0") == (
        'mknod("/tmp/fifo", S_IFIFO|0600, makedev(0, 0)) = ok')
    sh(CT, "rm -f /tmp/fifo")
    scratch = Path(tempfile.mkdtemp(prefix="popek-mknod-", dir="/var/tmp"))
    try:
        target = scratch / node
        assert host("mknod", str(target), kind, major, minor, share=share) == (
            f'mknod("{target}", {mode}|0600, makedev({major}, {minor})) = ok')
        assert target.exists()
    finally:
        shutil.rmtree(scratch)


def test_kvm_and_host_disks_not_reachable(ct: dict[str, object]) -> None:
    out = sh(CT, "ls /dev").stdout.split()
    assert "kvm" not in out and not any(d.startswith(("sd", "vd", "nvme", "mem")) for d in out)
    assert attack("open", "/dev/kvm") == 'open("/dev/kvm", O_RDWR) = ENOENT'
    disks = [d for d in ("/dev/vda", "/dev/sda", "/dev/nvme0n1") if Path(d).exists()]
    for disk in disks:
        assert attack("open", disk).startswith(f'open("{disk}", O_RDWR) = E')


def test_ptrace_fails(ct: dict[str, object]) -> None:
    assert attack("ptrace-pid", str(os.getpid())) == (
        f"ptrace(PTRACE_ATTACH, {os.getpid()}) = EPERM")
    assert attack("ptrace-pid", "1") == "ptrace(PTRACE_ATTACH, 1) = EPERM"
    assert attack("ptrace-child") == "ptrace(PTRACE_ATTACH, child) = EPERM"


def test_nested_user_namespace_fails(ct: dict[str, object]) -> None:
    assert attack("unshare-user") == "unshare(CLONE_NEWUSER) = EPERM"


def test_bind_mount_file_is_owned_by_the_mapped_uid(ct: dict[str, object], share: Path) -> None:
    assert sh(CT, "echo secret > /share/written-by-root && id -u").stdout.strip() == "0"
    st = (share / "written-by-root").stat()
    assert st.st_uid == ct["uid"] and st.st_uid >= 1_000_000_000  # not host root
    assert st.st_gid == ct["uid"]


def _responsive(timeout: float = 5.0) -> float:
    t0 = time.monotonic()
    subprocess.run(["true"], check=True, timeout=timeout)
    return time.monotonic() - t0


def _refused_forks(cgroup: Path) -> int:
    """The pids controller's count of forks it refused at the limit (``pids.events`` max)."""
    events = dict(line.split() for line in (cgroup / "pids.events").read_text().splitlines())
    return int(events["max"])


def test_fork_bomb_stopped_by_pids_limit(ct: dict[str, object], neighbour: str) -> None:
    """A fork bomb grows until the pids controller refuses forks (its ``max`` event
    counter rises); the host and the neighbour stay responsive."""
    pids = container_cgroup(CT, "pids")
    refused = _refused_forks(pids)
    sh(CT, "(f() { f | f & }; f) >/dev/null 2>&1 &", timeout=30)
    try:
        # the event: the pids controller refused a fork (its counter of refusals rose)
        wait_for(lambda: _refused_forks(pids) > refused, 20, "the pids limit to refuse a fork")
        assert int((pids / "pids.current").read_text()) <= 64
        assert _responsive() < 2.0  # the host still forks at once
        t0 = time.monotonic()
        assert popek("exec", neighbour, "--", "echo", "alive").stdout == "alive\n"
        assert time.monotonic() - t0 < 10
    finally:
        popek("restart", "--force", CT)
    assert sh(CT, "echo recovered").stdout == "recovered\n"


def test_memory_hog_killed_by_its_limit(ct: dict[str, object], neighbour: str) -> None:
    hog = sh(CT, "x=0123456789abcdef; while :; do x=$x$x; done", timeout=120)
    assert hog.returncode in (137, -9) or hog.returncode > 128, hog
    usage = popek_json("info", CT)["usage"]
    assert usage["memory"] <= 64 << 20
    assert popek("exec", neighbour, "--", "echo", "alive").stdout == "alive\n"
    assert instance(NEIGHBOUR)["state"] == "running"


HOARDER = "file-hoarder"
#: open as many files as the rlimit lets each process hold, one process after another,
#: until $1 files are held or a fork is refused; each holder is a ``sleep`` that keeps them
HOARD = """
n=$(ulimit -n)
held=0
while [ $held -lt $1 ]; do
  ( i=3; while [ $i -lt $((n - 3)) ]; do eval "exec $i</dev/null" || exit 1; i=$((i+1)); done
    sleep 100000 </dev/null >/dev/null 2>&1 & ) || break
  held=$((held + n - 6))
done
"""


def _kernel_memory(cgroup: Path) -> int:
    """Kernel memory charged to a memory cgroup (v1 ``kmem.usage``, v2 ``memory.stat`` kernel)."""
    if (cgroup / "memory.kmem.usage_in_bytes").exists():
        return int((cgroup / "memory.kmem.usage_in_bytes").read_text())
    stat = dict(line.split() for line in (cgroup / "memory.stat").read_text().splitlines())
    return int(stat["kernel"])


def test_open_files_stopped_well_below_file_max(minimal_image: str) -> None:
    """A container with the default limits tries to hold 300000 open files.

    Before, RLIMIT_NOFILE was 1024 for each of 1024 tasks (a million files,
    37 % of this host's file-max was measured).  Now RLIMIT_NOFILE x pids is
    at most min(2^18, file-max / 8): the attack is stopped by the pids
    controller (its refusal counter rises) with each holder at its rlimit,
    and what it holds, counted on the host, stays under that bound.  The file
    structs are kernel memory charged to the container's memory cgroup.
    """
    from popek.engines.container import spec

    popek("launch", minimal_image, HOARDER, "--container")
    try:
        pids, memory = container_cgroup(HOARDER, "pids"), container_cgroup(HOARDER, "memory")
        nofile = int(sh(HOARDER, "ulimit -n").stdout)
        pids_max = int((pids / "pids.max").read_text())
        file_max = int(Path("/proc/sys/fs/file-max").read_text())
        bound = min(spec.FILES_BUDGET, file_max // spec.FILE_MAX_SHARE)
        refused, kernel_before = _refused_forks(pids), _kernel_memory(memory)
        res = popek("exec", HOARDER, "--", "sh", "-c", HOARD, "sh", "300000", check=False,
                    timeout=300)
        held = 0
        for pid in (pids / "cgroup.procs").read_text().split():
            with contextlib.suppress(FileNotFoundError):
                held += len(os.listdir(f"/proc/{pid}/fd"))
        kernel = _kernel_memory(memory) - kernel_before
        assert "can't fork" in res.stderr and _refused_forks(pids) > refused, res.stderr
        assert held > 200_000, held  # the attack really ran: a thousand holders at the rlimit
        assert nofile * pids_max <= bound and held <= bound, (nofile, pids_max, held, bound)
        assert held < file_max // spec.FILE_MAX_SHARE  # under 1/8 of file-max (12.5 %)
        assert kernel >= held * 256, (kernel, held)  # a struct file is a 256-byte slab object
    finally:
        popek("delete", "--force", HOARDER, check=False)
