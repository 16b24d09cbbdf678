"""One syscall deny list for containers and sandboxes, with two back ends.

The list (:data:`DENIED`, :data:`ARG_RULES`, :data:`ENOSYS`) names what an
application or a container never needs and what the known escapes use: kernel
modules, kexec, BPF, keyrings, mounts and new namespaces, clocks, raw I/O ports,
other processes' memory, io_uring, and the file-handle calls of the "shocker"
escape.  Two back ends render it:

* :func:`oci_profile` -- the OCI runtime-spec ``linux.seccomp`` object that
  runc/crun compile with libseccomp (x86_64, i386 and x32 ABIs);
* :func:`bpf_program` -- a classic-BPF filter for x86_64, as
  ``bwrap --seccomp FD`` reads it (an array of ``struct sock_filter``).

Decisions on the edge cases:

* ``mknod``/``mknodat`` are denied only for character and block devices, so that
  ``mkfifo`` and Unix sockets keep working.
* ``clone`` is denied only with a ``CLONE_NEW*`` namespace flag (the same thing
  as ``unshare``); ``clone3`` passes its flags in memory that a filter cannot
  read, so it gets ``ENOSYS`` and the C library falls back to ``clone``.
* ``personality`` stays allowed: programs and loaders use it, and its dangerous
  old flags (``READ_IMPLIES_EXEC``...) need nothing from the host.
* The BPF back end answers ``ENOSYS`` for syscall numbers newer than its table
  (programs treat that as an older kernel), ``EPERM`` for the x32 ABI, and kills
  the process for any other architecture (i386 ``int 0x80``).
"""

from __future__ import annotations

import errno
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass

from popek.errors import EngineError, InvalidInput

DENIED: dict[str, str] = {
    # kernel code and the running kernel
    "init_module": "loads a kernel module",
    "finit_module": "loads a kernel module from a file",
    "delete_module": "unloads a kernel module",
    "create_module": "obsolete module call (Linux 2.4)",
    "get_kernel_syms": "obsolete module call (Linux 2.4)",
    "query_module": "obsolete module call (Linux 2.4)",
    "kexec_load": "replaces the running kernel",
    "kexec_file_load": "replaces the running kernel",
    "bpf": "loads eBPF programs into the kernel (a large attack surface)",
    "perf_event_open": "kernel profiling; leaks addresses, frequent kernel bugs",
    "lookup_dcookie": "kernel profiling (oprofile) helper",
    "syslog": "reads or clears the kernel log",
    "reboot": "reboots the host or enables Ctrl-Alt-Del",
    "acct": "switches process accounting on the host",
    "swapon": "adds swap to the host",
    "swapoff": "removes swap from the host",
    "_sysctl": "obsolete binary sysctl interface",
    "uselib": "obsolete a.out loader, a source of kernel bugs",
    "nfsservctl": "obsolete kernel NFS server control",
    "quotactl": "changes disk quotas",
    "quotactl_fd": "changes disk quotas",
    "vhangup": "hangs up the controlling terminal",
    # keyrings: not namespaced
    "keyctl": "kernel keyring, not namespaced: keys of other users and containers",
    "add_key": "kernel keyring, not namespaced",
    "request_key": "kernel keyring, not namespaced",
    # mounts and namespaces
    "mount": "mounts file systems",
    "umount2": "unmounts file systems, could uncover what the sandbox hides",
    "fsopen": "new mount API",
    "fsconfig": "new mount API",
    "fsmount": "new mount API",
    "fspick": "new mount API",
    "move_mount": "new mount API",
    "open_tree": "new mount API (clones mount trees)",
    "mount_setattr": "new mount API (changes mount flags such as read-only)",
    "pivot_root": "changes the root file system",
    "unshare": "creates namespaces: nested namespaces open kernel attack surface",
    "setns": "joins other namespaces",
    # clocks
    "clock_settime": "sets the host clock",
    "clock_adjtime": "adjusts the host clock",
    "settimeofday": "sets the host clock",
    "adjtimex": "adjusts the host clock",
    # raw hardware
    "iopl": "raw I/O port access",
    "ioperm": "raw I/O port access",
    # other processes
    "ptrace": "traces and controls other processes",
    "process_vm_readv": "reads another process's memory",
    "process_vm_writev": "writes another process's memory",
    "kcmp": "compares kernel objects of processes; leaks kernel pointers' order",
    "pidfd_getfd": "steals a file descriptor from another process",
    # file handles: the "shocker" container escape
    "open_by_handle_at": "opens any file by handle, bypassing the mount (shocker escape)",
    "name_to_handle_at": "makes file handles for open_by_handle_at",
    # memory and asynchronous I/O
    "userfaultfd": "pauses kernel memory accesses: widens kernel race exploits",
    "io_uring_setup": "io_uring: frequent kernel exploits, bypasses syscall filtering",
    "io_uring_enter": "io_uring",
    "io_uring_register": "io_uring",
}
"""Syscalls denied outright (``EPERM``), each with the reason."""

CLONE_NS_FLAGS: dict[str, int] = {
    "CLONE_NEWNS": 0x00020000, "CLONE_NEWCGROUP": 0x02000000, "CLONE_NEWUTS": 0x04000000,
    "CLONE_NEWIPC": 0x08000000, "CLONE_NEWUSER": 0x10000000, "CLONE_NEWPID": 0x20000000,
    "CLONE_NEWNET": 0x40000000,
}
S_IFMT, S_IFCHR, S_IFBLK = 0o170000, 0o020000, 0o060000


@dataclass(frozen=True)
class ArgRule:
    """Deny ``syscall`` (``EPERM``) when argument ``index`` matches one of ``matches``.

    Each match is ``(mask, value)``: it holds when ``arg & mask == value``.
    Only the low 32 bits of the argument are compared (flags and modes fit).
    """

    syscall: str
    index: int
    matches: tuple[tuple[int, int], ...]
    reason: str


ARG_RULES: tuple[ArgRule, ...] = (
    ArgRule("clone", 0, tuple((f, f) for f in CLONE_NS_FLAGS.values()),
            "with a CLONE_NEW* flag it creates namespaces, as unshare does"),
    ArgRule("mknod", 1, ((S_IFMT, S_IFCHR), (S_IFMT, S_IFBLK)), "creates device nodes"),
    ArgRule("mknodat", 2, ((S_IFMT, S_IFCHR), (S_IFMT, S_IFBLK)), "creates device nodes"),
)
"""Syscalls denied only for some arguments; other uses stay allowed."""

ENOSYS: dict[str, str] = {
    "clone3": "its flags cannot be filtered; ENOSYS makes the C library fall back to clone",
}
"""Syscalls answered with ``ENOSYS`` (as if the kernel were older)."""

# The x86_64 syscall table, generated once from Linux 6.1's
# /usr/include/x86_64-linux-gnu/asm/unistd_64.h (tests/unit/test_seccomp.py
# checks it against the header when it is installed).  Names in number order:
# 0..334, then 424..450.
_NAMES_FROM_0 = """
    read write open close stat fstat lstat poll lseek mmap mprotect munmap brk rt_sigaction
    rt_sigprocmask rt_sigreturn ioctl pread64 pwrite64 readv writev access pipe select
    sched_yield mremap msync mincore madvise shmget shmat shmctl dup dup2 pause nanosleep
    getitimer alarm setitimer getpid sendfile socket connect accept sendto recvfrom sendmsg
    recvmsg shutdown bind listen getsockname getpeername socketpair setsockopt getsockopt clone
    fork vfork execve exit wait4 kill uname semget semop semctl shmdt msgget msgsnd msgrcv
    msgctl fcntl flock fsync fdatasync truncate ftruncate getdents getcwd chdir fchdir rename
    mkdir rmdir creat link unlink symlink readlink chmod fchmod chown fchown lchown umask
    gettimeofday getrlimit getrusage sysinfo times ptrace getuid syslog getgid setuid setgid
    geteuid getegid setpgid getppid getpgrp setsid setreuid setregid getgroups setgroups
    setresuid getresuid setresgid getresgid getpgid setfsuid setfsgid getsid capget capset
    rt_sigpending rt_sigtimedwait rt_sigqueueinfo rt_sigsuspend sigaltstack utime mknod uselib
    personality ustat statfs fstatfs sysfs getpriority setpriority sched_setparam sched_getparam
    sched_setscheduler sched_getscheduler sched_get_priority_max sched_get_priority_min
    sched_rr_get_interval mlock munlock mlockall munlockall vhangup modify_ldt pivot_root
    _sysctl prctl arch_prctl adjtimex setrlimit chroot sync acct settimeofday mount umount2
    swapon swapoff reboot sethostname setdomainname iopl ioperm create_module init_module
    delete_module get_kernel_syms query_module quotactl nfsservctl getpmsg putpmsg afs_syscall
    tuxcall security gettid readahead setxattr lsetxattr fsetxattr getxattr lgetxattr fgetxattr
    listxattr llistxattr flistxattr removexattr lremovexattr fremovexattr tkill time futex
    sched_setaffinity sched_getaffinity set_thread_area io_setup io_destroy io_getevents
    io_submit io_cancel get_thread_area lookup_dcookie epoll_create epoll_ctl_old epoll_wait_old
    remap_file_pages getdents64 set_tid_address restart_syscall semtimedop fadvise64
    timer_create timer_settime timer_gettime timer_getoverrun timer_delete clock_settime
    clock_gettime clock_getres clock_nanosleep exit_group epoll_wait epoll_ctl tgkill utimes
    vserver mbind set_mempolicy get_mempolicy mq_open mq_unlink mq_timedsend mq_timedreceive
    mq_notify mq_getsetattr kexec_load waitid add_key request_key keyctl ioprio_set ioprio_get
    inotify_init inotify_add_watch inotify_rm_watch migrate_pages openat mkdirat mknodat
    fchownat futimesat newfstatat unlinkat renameat linkat symlinkat readlinkat fchmodat
    faccessat pselect6 ppoll unshare set_robust_list get_robust_list splice tee sync_file_range
    vmsplice move_pages utimensat epoll_pwait signalfd timerfd_create eventfd fallocate
    timerfd_settime timerfd_gettime accept4 signalfd4 eventfd2 epoll_create1 dup3 pipe2
    inotify_init1 preadv pwritev rt_tgsigqueueinfo perf_event_open recvmmsg fanotify_init
    fanotify_mark prlimit64 name_to_handle_at open_by_handle_at clock_adjtime syncfs sendmmsg
    setns getcpu process_vm_readv process_vm_writev kcmp finit_module sched_setattr
    sched_getattr renameat2 seccomp getrandom memfd_create kexec_file_load bpf execveat
    userfaultfd membarrier mlock2 copy_file_range preadv2 pwritev2 pkey_mprotect pkey_alloc
    pkey_free statx io_pgetevents rseq
"""
_NAMES_FROM_424 = """
    pidfd_send_signal io_uring_setup io_uring_enter io_uring_register open_tree move_mount
    fsopen fsconfig fsmount fspick pidfd_open clone3 close_range openat2 pidfd_getfd faccessat2
    process_madvise epoll_pwait2 mount_setattr quotactl_fd landlock_create_ruleset
    landlock_add_rule landlock_restrict_self memfd_secret process_mrelease futex_waitv
    set_mempolicy_home_node
"""


def _table() -> dict[str, int]:
    table = {name: nr for nr, name in enumerate(_NAMES_FROM_0.split())}
    table.update({name: 424 + i for i, name in enumerate(_NAMES_FROM_424.split())})
    return table


SYSCALLS_X86_64: dict[str, int] = _table()
"""Syscall name -> number on x86_64 (64-bit ABI)."""

MAX_NR = max(SYSCALLS_X86_64.values())

# classic BPF and seccomp constants (linux/filter.h, linux/seccomp.h, linux/audit.h)
BPF_LD_W_ABS, BPF_JEQ_K, BPF_JGT_K, BPF_JGE_K, BPF_AND_K, BPF_RET_K = (
    0x20, 0x15, 0x25, 0x35, 0x54, 0x06)
SECCOMP_RET_KILL_PROCESS = 0x80000000
SECCOMP_RET_ERRNO = 0x00050000
SECCOMP_RET_ALLOW = 0x7FFF0000
AUDIT_ARCH_X86_64 = 0xC000003E
X32_SYSCALL_BIT = 0x40000000
OFFSET_NR, OFFSET_ARCH, OFFSET_ARGS = 0, 4, 16


def check_names(names: Iterable[str], what: str = "seccomp_extra") -> tuple[str, ...]:
    """Return ``names`` without duplicates; raise :class:`InvalidInput` for an unknown syscall."""
    result: list[str] = []
    for name in names:
        if name not in SYSCALLS_X86_64:
            import difflib

            near = difflib.get_close_matches(str(name), SYSCALLS_X86_64, n=3)
            hint = f" (did you mean {', '.join(near)}?)" if near else ""
            raise InvalidInput(
                f"{what}: unknown syscall {name!r}{hint}; allowed: a name from the Linux "
                "x86_64 syscall table, such as 'chroot' or 'sethostname'")
        if name not in result:
            result.append(name)
    return tuple(result)


# -- back end 1: OCI runtime spec (libseccomp) ----------------------------------
def oci_profile(extra: Iterable[str] = ()) -> dict[str, object]:
    """Return the OCI ``linux.seccomp`` object: allow by default, deny the list with ``EPERM``.

    ``extra`` adds syscall names to deny (raises :class:`InvalidInput` for an
    unknown one).  runc and crun compile it with libseccomp.
    """
    denied = sorted({*DENIED, *check_names(extra)})
    syscalls: list[dict[str, object]] = [
        {"names": denied, "action": "SCMP_ACT_ERRNO", "errnoRet": errno.EPERM},
        {"names": sorted(n for n in ENOSYS if n not in denied), "action": "SCMP_ACT_ERRNO",
         "errnoRet": errno.ENOSYS},
    ]
    for rule in ARG_RULES:
        if rule.syscall in denied:
            continue
        syscalls.extend(
            {"names": [rule.syscall], "action": "SCMP_ACT_ERRNO", "errnoRet": errno.EPERM,
             "args": [{"index": rule.index, "value": mask, "valueTwo": value,
                       "op": "SCMP_CMP_MASKED_EQ"}]}
            for mask, value in rule.matches)
    return {
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
        "syscalls": [s for s in syscalls if s["names"]],
    }


# -- back end 2: classic BPF for bwrap --seccomp --------------------------------
def _insn(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
    return struct.pack("<HBBI", code, jt, jf, k)


def _ret(action: int) -> bytes:
    return _insn(BPF_RET_K, action)


def _arg_rule(rule: ArgRule) -> list[bytes]:
    """Instructions for one :class:`ArgRule`; A holds the syscall number on entry."""
    body: list[bytes] = []
    for mask, value in rule.matches:
        body += [_insn(BPF_LD_W_ABS, OFFSET_ARGS + 8 * rule.index), _insn(BPF_AND_K, mask),
                 _insn(BPF_JEQ_K, value, 0, 1), _ret(SECCOMP_RET_ERRNO | errno.EPERM)]
    body.append(_ret(SECCOMP_RET_ALLOW))
    return [_insn(BPF_JEQ_K, SYSCALLS_X86_64[rule.syscall], 0, len(body)), *body]


def bpf_program(extra: Iterable[str] = ()) -> bytes:
    """Return the x86_64 seccomp filter as ``struct sock_filter`` bytes (8 per instruction).

    Order: any other architecture is killed; x32 numbers get ``EPERM``; numbers
    newer than the table get ``ENOSYS``; :data:`ENOSYS`, :data:`ARG_RULES`,
    then every name of :data:`DENIED` and ``extra`` (``EPERM``); the rest is
    allowed.  Raises :class:`InvalidInput` for an unknown name in ``extra``.
    """
    denied = {*DENIED, *check_names(extra)}
    prog = [
        _insn(BPF_LD_W_ABS, OFFSET_ARCH),
        _insn(BPF_JEQ_K, AUDIT_ARCH_X86_64, 1, 0),
        _ret(SECCOMP_RET_KILL_PROCESS),
        _insn(BPF_LD_W_ABS, OFFSET_NR),
        _insn(BPF_JGE_K, X32_SYSCALL_BIT, 0, 1),
        _ret(SECCOMP_RET_ERRNO | errno.EPERM),
        _insn(BPF_JGT_K, MAX_NR, 0, 1),
        _ret(SECCOMP_RET_ERRNO | errno.ENOSYS),
    ]
    for name in sorted(set(ENOSYS) - denied):
        prog += [_insn(BPF_JEQ_K, SYSCALLS_X86_64[name], 0, 1),
                 _ret(SECCOMP_RET_ERRNO | errno.ENOSYS)]
    for rule in ARG_RULES:
        if rule.syscall not in denied:
            prog += _arg_rule(rule)
    for nr in sorted(SYSCALLS_X86_64[name] for name in denied):
        prog += [_insn(BPF_JEQ_K, nr, 0, 1), _ret(SECCOMP_RET_ERRNO | errno.EPERM)]
    prog.append(_ret(SECCOMP_RET_ALLOW))
    return b"".join(prog)


PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 38, 22, 2


def install(program: bytes) -> None:
    """Load ``program`` (from :func:`bpf_program`) into the calling process, for good.

    Sets ``no_new_privs`` first, so no root is needed.  It applies to every
    thread created afterwards and to every child; it cannot be removed.
    Raises :class:`EngineError` if the kernel refuses it.
    """
    import ctypes  # only the processes that install a filter need it
    import ctypes.util

    class _SockFprog(ctypes.Structure):
        _fields_ = (("len", ctypes.c_ushort), ("filter", ctypes.c_void_p))

    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    buf = ctypes.create_string_buffer(program, len(program))
    fprog = _SockFprog(len(program) // 8, ctypes.cast(buf, ctypes.c_void_p))
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 or libc.prctl(
            PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) != 0:
        err = ctypes.get_errno()
        raise EngineError(f"the kernel refused the seccomp filter: {os.strerror(err)}")
