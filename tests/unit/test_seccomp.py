"""The seccomp deny list and its two back ends (OCI profile, classic BPF for bwrap)."""

from __future__ import annotations

import errno
import json
import re
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from popek.engines import seccomp
from popek.errors import InvalidInput

HEADER = Path("/usr/include/x86_64-linux-gnu/asm/unistd_64.h")
EPERM = seccomp.SECCOMP_RET_ERRNO | errno.EPERM
ENOSYS = seccomp.SECCOMP_RET_ERRNO | errno.ENOSYS
ALLOW = seccomp.SECCOMP_RET_ALLOW


def decode(program: bytes) -> list[tuple[int, int, int, int]]:
    """Return the program as (code, jt, jf, k) tuples."""
    assert len(program) % 8 == 0
    return [struct.unpack_from("<HBBI", program, i) for i in range(0, len(program), 8)]


def run_filtered(program: bytes, body: str) -> dict[str, object]:
    """Run ``body`` in a child Python after it loaded ``program``; it prints one JSON object."""
    script = textwrap.dedent("""
        import ctypes, json, os, sys
        from popek.engines import seccomp
        libc = ctypes.CDLL(None, use_errno=True)
        def call(name, *args):
            ctypes.set_errno(0)
            r = libc.syscall(seccomp.SYSCALLS_X86_64.get(name, name), *args)
            return "ok" if r >= 0 else os.strerror(ctypes.get_errno())
        if sys.argv[1]:
            seccomp.install(bytes.fromhex(sys.argv[1]))
    """) + textwrap.dedent(body)
    out = subprocess.run([sys.executable, "-c", script, program.hex()], capture_output=True,
                         text=True, check=True, timeout=30)
    return dict(json.loads(out.stdout))


# -- the table ----------------------------------------------------------------
@pytest.mark.skipif(not HEADER.exists(), reason="linux-libc-dev is not installed")
def test_syscall_table_matches_kernel_header() -> None:
    header = dict(re.findall(r"#define __NR_(\w+)\s+(\d+)", HEADER.read_text()))
    from_header = {name: int(nr) for name, nr in header.items()}
    assert from_header == seccomp.SYSCALLS_X86_64


def test_known_numbers() -> None:
    table = seccomp.SYSCALLS_X86_64
    assert (table["read"], table["getpid"], table["mount"], table["io_uring_setup"]) == (
        0, 39, 165, 425)
    assert max(table.values()) == seccomp.MAX_NR


def test_every_listed_syscall_exists_on_x86_64() -> None:
    names = [*seccomp.DENIED, *seccomp.ENOSYS, *(r.syscall for r in seccomp.ARG_RULES)]
    assert all(name in seccomp.SYSCALLS_X86_64 for name in names)
    assert all(reason for reason in seccomp.DENIED.values())


@pytest.mark.parametrize("name", ["keyctl", "open_by_handle_at", "unshare", "setns", "bpf",
                                  "ptrace", "io_uring_setup", "kexec_load", "mount"])
def test_dangerous_syscalls_are_denied(name: str) -> None:
    assert name in seccomp.DENIED


def test_unknown_name_is_refused_with_suggestion() -> None:
    with pytest.raises(InvalidInput, match=r"unknown syscall 'keyctll' \(did you mean keyctl"):
        seccomp.bpf_program(["keyctll"])
    with pytest.raises(InvalidInput, match="allowed: a name from the Linux x86_64"):
        seccomp.oci_profile(["nope"])


# -- OCI back end ---------------------------------------------------------------
def test_oci_profile_shape() -> None:
    profile = seccomp.oci_profile()
    json.dumps(profile)
    assert profile["defaultAction"] == "SCMP_ACT_ALLOW"
    assert profile["architectures"] == ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"]
    rules = profile["syscalls"]
    assert isinstance(rules, list)
    deny = rules[0]
    assert deny["action"] == "SCMP_ACT_ERRNO" and deny["errnoRet"] == errno.EPERM
    assert set(deny["names"]) == set(seccomp.DENIED)
    assert {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": errno.ENOSYS} in rules
    newuser = {"index": 0, "value": 0x10000000, "valueTwo": 0x10000000,
               "op": "SCMP_CMP_MASKED_EQ"}
    assert any(r["names"] == ["clone"] and r["args"] == [newuser] for r in rules)


def test_oci_profile_extra_names() -> None:
    profile = seccomp.oci_profile(["chroot", "clone"])
    rules = profile["syscalls"]
    assert isinstance(rules, list)
    assert {"chroot", "clone"} <= set(rules[0]["names"])
    assert not any(r["names"] == ["clone"] for r in rules)  # denied outright, no arg rules


# -- BPF back end ---------------------------------------------------------------
def test_bpf_program_prologue() -> None:
    insns = decode(seccomp.bpf_program())
    assert insns[:8] == [
        (seccomp.BPF_LD_W_ABS, 0, 0, 4),                             # A = arch
        (seccomp.BPF_JEQ_K, 1, 0, seccomp.AUDIT_ARCH_X86_64),
        (seccomp.BPF_RET_K, 0, 0, seccomp.SECCOMP_RET_KILL_PROCESS),  # other arch: kill
        (seccomp.BPF_LD_W_ABS, 0, 0, 0),                             # A = nr
        (seccomp.BPF_JGE_K, 0, 1, seccomp.X32_SYSCALL_BIT),
        (seccomp.BPF_RET_K, 0, 0, EPERM),                            # x32 ABI
        (seccomp.BPF_JGT_K, 0, 1, seccomp.MAX_NR),
        (seccomp.BPF_RET_K, 0, 0, ENOSYS),                           # newer than the table
    ]
    assert insns[-1] == (seccomp.BPF_RET_K, 0, 0, ALLOW)


def test_bpf_program_denies_each_name() -> None:
    insns = decode(seccomp.bpf_program(["chroot"]))
    for name in [*seccomp.DENIED, "chroot"]:
        nr = seccomp.SYSCALLS_X86_64[name]
        i = insns.index((seccomp.BPF_JEQ_K, 0, 1, nr))
        assert insns[i + 1] == (seccomp.BPF_RET_K, 0, 0, EPERM)
    assert len(insns) < 4096  # BPF_MAXINSNS


def test_bpf_program_clone_rule_checks_namespace_flags() -> None:
    insns = decode(seccomp.bpf_program())
    start = insns.index((seccomp.BPF_JEQ_K, 0, 29, seccomp.SYSCALLS_X86_64["clone"]))
    body = insns[start + 1:start + 30]
    masks = {k for code, _, _, k in body if code == seccomp.BPF_AND_K}
    assert masks == set(seccomp.CLONE_NS_FLAGS.values())
    assert body[0] == (seccomp.BPF_LD_W_ABS, 0, 0, 16)  # low word of args[0]
    assert body[-1] == (seccomp.BPF_RET_K, 0, 0, ALLOW)


def test_filter_denies_in_a_real_process() -> None:
    body = """
        CLONE_NEWUSER, SIGCHLD = 0x10000000, 17
        r = libc.syscall(56, CLONE_NEWUSER | SIGCHLD, 0, 0, 0, 0)
        if r == 0:
            os._exit(0)
        clone_ns = "ok" if r > 0 else os.strerror(ctypes.get_errno())
        print(json.dumps({
            "getpid": os.getpid() > 0,
            "unshare0": call("unshare", 0),
            "kcmp": call("kcmp", os.getpid(), os.getpid(), 0, 0, 0),
            "syslog": call("syslog", 10, 0, 0),
            "acct": call("acct", 0),
            "mount": call("mount", 0, 0, 0, 0, 0),
            "keyctl": call("keyctl", 0, -2, 0),
            "io_uring_setup": call("io_uring_setup", 0, 0),
            "clone_newuser": clone_ns,
            "clone3": call("clone3", 0, 0),
            "x32_getpid": call(0x40000000 + 39),
            "future": call(seccomp.MAX_NR + 20),
        }))
    """
    filtered = run_filtered(seccomp.bpf_program(), body)
    denied = "Operation not permitted"
    assert filtered["getpid"] is True
    for name in ("unshare0", "kcmp", "syslog", "acct", "mount", "keyctl", "io_uring_setup",
                 "clone_newuser", "x32_getpid"):
        assert filtered[name] == denied, name
    assert filtered["clone3"] == filtered["future"] == "Function not implemented"
    # Without the filter the harmless calls succeed: the EPERM above is the filter's.
    plain = run_filtered(b"", body)
    assert plain["unshare0"] == plain["kcmp"] == "ok"


def test_filter_keeps_fifos_and_refuses_devices(tmp_path: Path) -> None:
    body = f"""
        import stat
        def mk(name, mode):
            try:
                os.mknod({str(tmp_path)!r} + "/" + name, mode, os.makedev(1, 3))
                return "ok"
            except OSError as e:
                return e.strerror
        print(json.dumps({{"fifo": mk("fifo", stat.S_IFIFO | 0o600),
                           "chr": mk("null", stat.S_IFCHR | 0o600)}}))
    """
    result = run_filtered(seccomp.bpf_program(), body)
    assert result == {"fifo": "ok", "chr": "Operation not permitted"}


def test_extra_names_are_denied_in_a_real_process() -> None:
    body = 'print(json.dumps({"uname": call("uname", 0)}))'
    assert run_filtered(seccomp.bpf_program(["uname"]), body) == {
        "uname": "Operation not permitted"}
