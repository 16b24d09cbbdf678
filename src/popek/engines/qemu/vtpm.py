"""The virtual TPM of a VM: one swtpm per instance, and the launch measurement for the guest.

popek starts ``swtpm socket --tpm2`` as the instance's own uid, with its
state in the instance directory, its control socket ``swtpm.sock`` for QEMU
(``-tpmdev emulator``, a TPM 2.0 CRB device in the guest), its own seccomp
profile and ``--terminate``: it ends when QEMU closes the connection.

The launch measurement (see :mod:`popek.trust.measure`) is handed to the
guest as the fw_cfg file ``opt/org.popek/measurement`` (32 raw bytes); the
minimal guest's init extends it into PCR 15 before anything else runs, and
its verifier ``popek-verify check`` compares PCR 15 with the quote it is
given.  A measurement cannot sit in the QEMU argv it measures, so QEMU reads
it from ``measurement.bin``, written just before QEMU starts.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from popek import proc
from popek.errors import EngineError

SWTPM = "swtpm"
FW_CFG_NAME = "opt/org.popek/measurement"


def socket_path(workdir: Path) -> Path:
    """The swtpm control socket QEMU connects to."""
    return workdir / "swtpm.sock"


def fw_cfg_file(workdir: Path) -> Path:
    """The 32-byte launch measurement QEMU passes to the guest."""
    return workdir / "measurement.bin"


def qemu_args(workdir: Path) -> list[str]:
    """QEMU options for the TPM device and the measurement fw_cfg entry."""
    return [
        "-chardev", f"socket,id=chrtpm,path={socket_path(workdir)}",
        "-tpmdev", "emulator,id=tpm0,chardev=chrtpm",
        "-device", "tpm-crb,tpmdev=tpm0",
        "-fw_cfg", f"name={FW_CFG_NAME},file={fw_cfg_file(workdir)}",
    ]


def write_measurement(workdir: Path, value_hex: str) -> None:
    """Write the measurement QEMU hands the guest (root-owned, readable by QEMU's uid)."""
    path = fw_cfg_file(workdir)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(bytes.fromhex(value_hex))
    tmp.chmod(0o644)
    tmp.replace(path)


def start(workdir: Path, uid: int, gid: int) -> None:
    """Start the instance's swtpm (detached, as ``uid``); return once its socket is there.

    Raises :class:`EngineError` when swtpm is missing or does not come up.
    """
    binary = proc.tool(SWTPM)
    if binary is None:
        raise EngineError("swtpm is not installed: install the Debian package swtpm "
                          "(make demo does it)")
    stop(workdir)
    state = workdir / "tpm"
    state.mkdir(mode=0o700, exist_ok=True)
    os.chown(state, uid, gid)
    sock, log = socket_path(workdir), workdir / "swtpm.log"
    argv = [binary, "socket", "--tpm2", "--tpmstate", f"dir={state}",
            "--ctrl", f"type=unixio,path={sock}", "--flags", "startup-clear",
            "--terminate", "--daemon", "--pid", f"file={workdir / 'swtpm.pid'}",
            "--log", f"file={log},level=1", "--seccomp", "action=kill"]
    try:
        res = proc.run(argv, 10.0, user=uid, group=gid, extra_groups=[], umask=0o077,
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, start_new_session=True)
    except (OSError, subprocess.SubprocessError) as exc:
        raise EngineError(f"cannot start swtpm: {exc}") from exc
    if res.returncode != 0:
        raise EngineError(f"swtpm failed: {(res.stderr or b'').decode(errors='replace')[-300:]}")
    if not proc.wait_until(sock.exists, 5.0, 0.005):
        raise EngineError("swtpm did not create its socket within 5 s")


def stop(workdir: Path) -> None:
    """Stop the instance's swtpm if it still runs; remove its socket."""
    proc.end_recorded(workdir / "swtpm.pid", str(workdir))
    socket_path(workdir).unlink(missing_ok=True)
