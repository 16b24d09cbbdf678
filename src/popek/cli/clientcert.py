"""This user's TLS client certificate for remotes, made on first use (as incus's client does).

``popek remote add NAME https://...`` without ``--token`` authenticates with a
client certificate: a key and a self-signed certificate in the user's config
directory, next to ``remotes.json``: ``client.key`` (0600) and ``client.crt``,
made once (EC P-256, valid :data:`VALID_DAYS` days) and then kept for every
remote.  The host admin of each remote trusts that certificate for a project
and a role (``popek certificate add client.crt --project P --role R``).
"""

from __future__ import annotations

import contextlib
import getpass
import os
import socket
from pathlib import Path

from popek.cli.remotes import config_path
from popek.errors import InvalidInput

#: how long a client certificate made here is valid
VALID_DAYS = 3650


def paths() -> tuple[Path, Path]:
    """``(client.crt, client.key)`` in the user's popek config directory."""
    d = config_path().parent
    return d / "client.crt", d / "client.key"


def _write(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), mode)
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def ensure() -> tuple[Path, Path, bool]:
    """The client's ``(certificate, key)``, made when missing; the flag: made just now.

    The key is written first (0600) and the certificate last, so a pair is
    whole once the certificate exists.
    """
    from popek.core.certificates import self_signed

    cert, key = paths()
    if cert.exists() and key.exists():
        return cert, key, False
    cert.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    pem_cert, pem_key = self_signed(f"popek-client {user}@{socket.gethostname()}", VALID_DAYS)
    try:
        _write(key, pem_key, 0o600)
        _write(cert, pem_cert, 0o644)
    except OSError as exc:
        raise InvalidInput(f"cannot write the client certificate in {cert.parent}: "
                           f"{exc.strerror}") from exc
    return cert, key, True


def fingerprint(cert: Path) -> str:
    """The SHA-256 fingerprint of the certificate ``cert`` (hex)."""
    from popek.core.certificates import fingerprint as of_der
    from popek.core.certificates import parse

    return of_der(parse(cert.read_bytes(), str(cert))[1])
