"""Talking to QEMU over QMP with QEMU's own ``qemu.qmp`` library.

QEMU's QMP socket serves one client at a time, so every conversation holds an
exclusive lock file in the instance directory.  Each call opens a short
session: popek keeps no connection (and no process) per instance.
"""

from __future__ import annotations

from collections.abc import Mapping
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
    import asyncio

    from qemu.qmp import ConnectError, ExecuteError, QMPError

    try:
        with flocked(sock.with_suffix(".lock")):
            return asyncio.run(_session(sock, commands, timeout, fd))
    except ExecuteError as exc:
        raise EngineError(f"QEMU refused {exc.sent.get('execute')}: {exc}") from exc
    except (ConnectError, OSError, TimeoutError, EOFError) as exc:
        raise EngineError(f"cannot reach QEMU's control socket {sock}: {exc}") from exc
    except QMPError as exc:
        raise EngineError(f"QMP error on {sock}: {exc}") from exc
