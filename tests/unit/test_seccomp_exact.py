"""The seccomp deny list's exact shapes: syscall table, name checks, OCI argument rules.

Written against the survivors of ``make mutants`` (bench/mutants.py).  The
OCI profile's argument rules are spelled out by hand here: runc compiles
them with libseccomp, which the unit suite does not run, so a changed key or
action would otherwise only show in the integration suite.
"""

from __future__ import annotations

import errno
import re
from pathlib import Path

import pytest

from popek.engines import seccomp
from popek.errors import InvalidInput

HEADER = Path("/usr/include/x86_64-linux-gnu/asm/unistd_64.h")
SUFFIX = ("; allowed: a name from the Linux x86_64 syscall table, such as 'chroot' or "
          "'sethostname'")


def test_table_builder_numbers_both_ranges() -> None:
    """_table() runs at import; called here so a change to it is seen (and checked)."""
    table = seccomp._table()
    assert table == seccomp.SYSCALLS_X86_64
    assert (table["read"], table["rseq"]) == (0, 334)
    assert (table["pidfd_send_signal"], table["clone3"], table["set_mempolicy_home_node"]) == (
        424, 435, 450)
    assert len(table) == 335 + 27
    if HEADER.exists():
        header = {n: int(nr) for n, nr in
                  re.findall(r"#define __NR_(\w+)\s+(\d+)", HEADER.read_text())}
        assert table == header


def test_check_names_keeps_order_and_drops_duplicates() -> None:
    assert seccomp.check_names(["ptrace", "chroot", "ptrace", "chroot"]) == ("ptrace", "chroot")
    assert seccomp.check_names([]) == ()


def test_unknown_name_message_default_what_and_three_suggestions() -> None:
    with pytest.raises(InvalidInput) as exc:
        seccomp.check_names(["setresxid"])
    assert str(exc.value) == ("seccomp_extra: unknown syscall 'setresxid' (did you mean "
                              "setresuid, setresgid, setreuid?)" + SUFFIX)


def test_unknown_name_without_a_close_match_has_no_hint() -> None:
    with pytest.raises(InvalidInput) as exc:
        seccomp.check_names(["zzzzzz"], "profile x")
    assert str(exc.value) == "profile x: unknown syscall 'zzzzzz'" + SUFFIX


def _arg_entries(name: str, index: int, matches: list[tuple[int, int]]) -> list[dict[str, object]]:
    return [{"names": [name], "action": "SCMP_ACT_ERRNO", "errnoRet": errno.EPERM,
             "args": [{"index": index, "value": mask, "valueTwo": value,
                       "op": "SCMP_CMP_MASKED_EQ"}]} for mask, value in matches]


CLONE_FLAGS = [0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000,
               0x40000000]
DEVICES = [(0o170000, 0o020000), (0o170000, 0o060000)]  # S_IFCHR, S_IFBLK
CLONE = _arg_entries("clone", 0, [(f, f) for f in CLONE_FLAGS])
MKNOD = _arg_entries("mknod", 1, DEVICES) + _arg_entries("mknodat", 2, DEVICES)


def test_oci_profile_exactly() -> None:
    profile = seccomp.oci_profile()
    assert profile == {
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
        "syscalls": [
            {"names": sorted(seccomp.DENIED), "action": "SCMP_ACT_ERRNO",
             "errnoRet": errno.EPERM},
            {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": errno.ENOSYS},
            *CLONE, *MKNOD,
        ],
    }


def test_oci_profile_denying_clone_keeps_the_other_argument_rules() -> None:
    profile = seccomp.oci_profile(["clone", "clone3"])
    assert profile["syscalls"] == [
        {"names": sorted({*seccomp.DENIED, "clone", "clone3"}), "action": "SCMP_ACT_ERRNO",
         "errnoRet": errno.EPERM},
        *MKNOD,
    ]
