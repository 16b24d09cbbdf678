"""Talking to QEMU over QMP with QEMU's own ``qemu.qmp`` library.

QEMU's QMP socket serves one client at a time, so every conversation holds an
exclusive lock file in the instance directory.  Each call opens a short
session: popek keeps no connection (and no process) per instance.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Coroutine, Mapping, Sequence
from pathlib import Path
from typing import Any

from popek.errors import EngineError
from popek.proc import flocked

# qemu.qmp (and asyncio under it) is imported on first use: commands that do
# not speak QMP, such as launch, do not pay for it.


async def _session(sock: Path, commands: list[tuple[str, Mapping[str, object] | None]],
                   timeout: float, fd: tuple[int, str] | None = None) -> list[object]:
    import asyncio
    import logging

    from qemu.qmp import QMPClient

    # qemu.qmp logs every disconnect at WARNING; popek reports errors itself.
    logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)

    qmp = QMPClient("popek")
    try:
        await asyncio.wait_for(qmp.connect(str(sock)), timeout)
        if fd is not None:  # hand QEMU a file descriptor under a name (SCM_RIGHTS + getfd)
            qmp.send_fd_scm(fd[0])
            await asyncio.wait_for(qmp.execute("getfd", {"fdname": fd[1]}), timeout)
        results = []
        for cmd, args in commands:
            results.append(await asyncio.wait_for(qmp.execute(cmd, args), timeout))
        return results
    finally:
        await qmp.disconnect()


def execute(sock: Path, cmd: str, args: Mapping[str, object] | None = None,
            timeout: float = 10.0) -> Any:
    """Run one QMP command on the QEMU listening at ``sock`` and return its result.

    Raises :class:`EngineError` when QEMU cannot be reached or refuses the command.
    """
    return execute_many(sock, [(cmd, args)], timeout)[0]


def execute_with_fd(sock: Path, fd: int, fdname: str,
                    commands: list[tuple[str, Mapping[str, object] | None]],
                    timeout: float = 10.0) -> list[Any]:
    """Pass ``fd`` to QEMU as ``fdname``, then run ``commands`` in the same session."""
    return execute_many(sock, commands, timeout, (fd, fdname))


def execute_many(sock: Path, commands: list[tuple[str, Mapping[str, object] | None]],
                 timeout: float = 10.0, fd: tuple[int, str] | None = None) -> list[Any]:
    """Run several QMP commands in one session; return their results in order."""
    return _locked(sock, lambda: _session(sock, commands, timeout, fd))


def _locked(sock: Path, session: Callable[[], Coroutine[Any, Any, list[object]]]) -> list[Any]:
    """Run the conversation ``session`` makes with the QEMU at ``sock`` under its lock;
    a refusal or an unreachable QEMU is an :class:`EngineError`."""
    import asyncio

    from qemu.qmp import ConnectError, ExecuteError, QMPError

    try:
        with flocked(sock.with_suffix(".lock")):
            return asyncio.run(session())
    except ExecuteError as exc:
        raise EngineError(f"QEMU refused {exc.sent.get('execute')}: {exc}") from exc
    except (ConnectError, OSError, TimeoutError, EOFError) as exc:
        raise EngineError(f"cannot reach QEMU's control socket {sock}: {exc}") from exc
    except QMPError as exc:
        raise EngineError(f"QMP error on {sock}: {exc}") from exc


async def _fdset_session(sock: Path, fds: Sequence[int],
                         build: Callable[[list[int]], list[tuple[str, Mapping[str, object]]]],
                         timeout: float) -> list[object]:
    import asyncio
    import logging

    from qemu.qmp import QMPClient

    logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)
    qmp = QMPClient("popek")
    try:
        await asyncio.wait_for(qmp.connect(str(sock)), timeout)
        sets: list[int] = []
        try:
            for fd in fds:  # each descriptor into an fd set of its own (SCM_RIGHTS + add-fd)
                qmp.send_fd_scm(fd)
                added = await asyncio.wait_for(qmp.execute("add-fd"), timeout)
                sets.append(int(added["fdset-id"]))  # type: ignore[index]
            results = []
            for cmd, args in build(sets):
                results.append(await asyncio.wait_for(qmp.execute(cmd, args), timeout))
            return results
        except BaseException:
            for fdset in sets:  # nothing uses them: give them back
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(qmp.execute("remove-fd", {"fdset-id": fdset}),
                                           timeout)
            raise
    finally:
        await qmp.disconnect()


def execute_with_fdsets(sock: Path, fds: Sequence[int],
                        build: Callable[[list[int]], list[tuple[str, Mapping[str, object]]]],
                        timeout: float = 10.0) -> list[Any]:
    """Hand QEMU each of ``fds`` in an fd set of its own (``add-fd``), then run the
    commands ``build`` makes from those sets' ids, all in one session (an fd set no
    device uses is closed when its session ends).  When a command is refused, the fd
    sets are removed again and :class:`EngineError` raised."""
    return _locked(sock, lambda: _fdset_session(sock, fds, build, timeout))


def blockstats(socks: Sequence[Path], timeout: float = 1.0) -> dict[Path, tuple[int, int]]:
    """Bytes read and written by the guest's block devices, for each QEMU at ``socks``.

    ``query-blockstats`` asked of every QEMU at once in one event loop (a
    scrape of many VMs costs about one round trip, not one per VM).  A QEMU
    whose control socket another popek command holds (its lock is taken),
    or that does not answer within ``timeout`` seconds, is left out: a
    metrics scrape never waits for an operation.
    """
    import asyncio
    import fcntl

    from qemu.qmp import QMPError

    locks = []
    asked: list[Path] = []
    try:
        for sock in socks:
            try:
                f = open(sock.with_suffix(".lock"), "a")  # noqa: SIM115 (held until the end)
            except OSError:
                continue
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                f.close()
                continue
            locks.append(f)
            asked.append(sock)

        async def ask_all() -> list[object]:
            return await asyncio.gather(
                *(_session(s, [("query-blockstats", None)], timeout) for s in asked),
                return_exceptions=True)

        answers = asyncio.run(ask_all()) if asked else []
    finally:
        for f in locks:
            f.close()  # closing the file releases its flock
    out: dict[Path, tuple[int, int]] = {}
    for sock, answer in zip(asked, answers, strict=True):
        if isinstance(answer, BaseException):
            if not isinstance(answer, QMPError | OSError | TimeoutError | EOFError):
                raise answer
            continue
        devices = answer[0] if isinstance(answer, list) else []
        read = write = 0
        for dev in devices if isinstance(devices, list) else []:
            stats = dev.get("stats", {}) if isinstance(dev, dict) else {}
            read += int(stats.get("rd_bytes", 0))
            write += int(stats.get("wr_bytes", 0))
        out[sock] = (read, write)
    return out
