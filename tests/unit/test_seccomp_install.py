"""seccomp.install: the filter is loaded into the calling process, for good.

tests/unit/test_seccomp.py runs its filters in a fresh interpreter, which
imports popek from the source tree; these tests call :func:`seccomp.install`
in the test process itself (a forked child for the real filter, a stand-in
C library for the kernel's refusals), so a mutated ``install`` is the one
that runs under ``make mutants``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import json
import os
from typing import Any

import pytest

from popek.engines import seccomp
from popek.errors import EngineError


def _in_forked_child(program: bytes) -> dict[str, Any]:
    """Install ``program`` in a forked child; return what the child saw afterwards."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        os.close(r)
        out: dict[str, Any] = {}
        try:
            seccomp.install(program)
            libc = ctypes.CDLL(None, use_errno=True)
            ctypes.set_errno(0)
            rc = libc.syscall(seccomp.SYSCALLS_X86_64["keyctl"], 0, 0, 0, 0, 0)
            out["keyctl"] = ctypes.get_errno() if rc < 0 else 0
            out["getpid"] = libc.syscall(seccomp.SYSCALLS_X86_64["getpid"]) == os.getpid()
            with open("/proc/self/status") as f:
                status = dict(line.split(":\t", 1) for line in f if ":\t" in line)
            out["no_new_privs"] = status["NoNewPrivs"].strip()
            out["seccomp"] = status["Seccomp"].strip()
        except BaseException as exc:  # reported to the parent
            out["error"] = f"{type(exc).__name__}: {exc}"
        os.write(w, json.dumps(out).encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
    return dict(json.loads(data))


def test_install_filters_this_process_and_sets_no_new_privs(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # First one refused call in this process: make mutants maps each test to the
    # functions it runs in-process (not in the child), so this is what makes it
    # run this test against install's mutants.
    with monkeypatch.context() as m:
        m.setattr(ctypes, "CDLL", lambda *a, **k: _FakeLibc(38, errno.EPERM))
        with pytest.raises(EngineError):
            seccomp.install(b"")
    got = _in_forked_child(seccomp.bpf_program())
    assert got == {"keyctl": errno.EPERM, "getpid": True, "no_new_privs": "1", "seccomp": "2"}


def test_without_install_nothing_is_filtered() -> None:
    """The control: the same probe in a child that installed nothing is not refused."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover
        os.close(r)
        libc = ctypes.CDLL(None, use_errno=True)
        ctypes.set_errno(0)
        rc = libc.syscall(seccomp.SYSCALLS_X86_64["keyctl"], 0, 0, 0, 0, 0)
        os.write(w, str(ctypes.get_errno() if rc < 0 else 0).encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        err = int(f.read())
    os.waitpid(pid, 0)
    assert err != errno.EPERM


class _FakeLibc:
    """A C library whose prctl records its calls and fails for one option."""

    def __init__(self, fail_option: int, err: int) -> None:
        self.fail_option, self.err = fail_option, err
        self.calls: list[tuple[Any, ...]] = []
        self.opened: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def open(self, *args: Any, **kwargs: Any) -> _FakeLibc:
        """Stands in for ctypes.CDLL: records how the library was opened."""
        self.opened.append((args, kwargs))
        return self

    def prctl(self, *args: Any) -> int:
        self.calls.append(args)
        if args[0] == self.fail_option:
            ctypes.set_errno(self.err)
            return -1
        return 0


@pytest.fixture
def fake_libc(monkeypatch: pytest.MonkeyPatch) -> Any:
    def make(fail_option: int, err: int) -> _FakeLibc:
        fake = _FakeLibc(fail_option, err)
        monkeypatch.setattr(ctypes, "CDLL", fake.open)
        return fake
    return make


def test_no_new_privs_refused_stops_before_the_filter(fake_libc: Any) -> None:
    fake = fake_libc(seccomp.PR_SET_NO_NEW_PRIVS, errno.EPERM)
    with pytest.raises(EngineError) as exc:
        seccomp.install(seccomp.bpf_program())
    assert str(exc.value) == "the kernel refused the seccomp filter: Operation not permitted"
    assert fake.calls == [(38, 1, 0, 0, 0)]
    # the C library by its name, with errno kept for the message
    assert fake.opened == [((ctypes.util.find_library("c"),), {"use_errno": True})]


def test_filter_refused_is_reported_with_the_kernels_reason(fake_libc: Any) -> None:
    program = seccomp.bpf_program(["ptrace"])
    fake = fake_libc(seccomp.PR_SET_SECCOMP, errno.EINVAL)
    with pytest.raises(EngineError) as exc:
        seccomp.install(program)
    assert str(exc.value) == "the kernel refused the seccomp filter: Invalid argument"
    assert [c[0] for c in fake.calls] == [38, 22]
    assert fake.calls[0] == (38, 1, 0, 0, 0)
    option, mode, fprog_ref, arg4, arg5 = fake.calls[1]
    assert (option, mode, arg4, arg5) == (22, 2, 0, 0)
    fprog = fprog_ref._obj  # the struct sock_fprog passed by reference
    assert fprog.len == len(program) // 8
    assert ctypes.string_at(fprog.filter, len(program)) == program
