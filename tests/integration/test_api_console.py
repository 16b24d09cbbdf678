"""The console and interactive exec over websockets (issue 14.2), on a real ``popek serve``.

One server on a private socket and a TLS port, over the session's POPEK_HOME,
and one container.  Its console takes a command line and shows its output,
and a detach leaves the container running; an exec with a terminal runs on a
pseudo-terminal of the size asked for, follows a resize, and ends with the
command's exit code; an exec without a terminal keeps stdout and stderr
apart; each session is audited; a token without the console grant gets 403
and its attempt is audited as denied, while one with the grant gets through.
The CLI on a pseudo-terminal drives ``popek console`` and ``popek exec`` on a
remote through the same websockets; a VM's serial console and its exec
(through the guest agent, with and without a terminal) go through them too,
and ``popek exec`` of a VM from a terminal gets a terminal in the guest.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import termios
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import ClientConnection, connect, unix_connect

from framework import popek, popek_json
from framework.events import read_line, wait_state

CT = "hws-ct"
#: how long one read of the websocket may wait
READ_S = 30.0
#: the shell's question of where the cursor is, and a terminal's answer (row 1, column 1):
#: unanswered, it takes the next input for the answer
CURSOR_QUERY, CURSOR_REPLY = b"\x1b[6n", b"\x1b[1;1R"


@dataclass
class Server:
    proc: subprocess.Popen[str]
    sock: Path
    port: int

    def client(self) -> httpx.Client:
        return httpx.Client(transport=httpx.HTTPTransport(uds=str(self.sock)),
                            base_url="http://popek", timeout=300)

    def ws(self, path: str, **query: Any) -> ClientConnection:
        """A websocket on the local socket (root: the host admin)."""
        return unix_connect(str(self.sock), f"ws://popek{path}?{urlencode(query, doseq=True)}",
                            open_timeout=READ_S)

    def wss(self, path: str, token: str, **query: Any) -> ClientConnection:
        """A websocket on the TLS listener with a bearer token, the certificate pinned."""
        cert = Path(os.environ["POPEK_HOME"]) / "api" / "server.crt"
        ctx = ssl.create_default_context(cafile=str(cert))
        ctx.check_hostname = False
        return connect(f"wss://127.0.0.1:{self.port}{path}?{urlencode(query, doseq=True)}",
                       ssl=ctx, additional_headers={"Authorization": f"Bearer {token}"},
                       open_timeout=READ_S)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def server(popek_home: Path, minimal_image: str) -> Iterator[Server]:
    d = Path(tempfile.mkdtemp(prefix="hws-"))
    sock, port = d / "api.sock", _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "popek", "serve", "--socket", str(sock),
                             "--listen", f"127.0.0.1:{port}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    try:
        read_line(proc.stdout, 60, "popek serve to listen on its socket")
        read_line(proc.stdout, 60, "popek serve to listen on TCP")
        popek("launch", minimal_image, CT, "--container", "--memory", "96MiB")
        yield Server(proc, sock, port)
    finally:
        popek("delete", "--force", CT, check=False)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
        import shutil

        shutil.rmtree(d, ignore_errors=True)


def read_until(ws: ClientConnection, marker: bytes, prefixed: bool = False) -> bytes:
    """The output of ``ws`` up to and including ``marker``, within READ_S seconds."""
    got = b""
    deadline = time.monotonic() + READ_S
    while marker not in got:
        try:
            msg = ws.recv(timeout=max(0.1, deadline - time.monotonic()))
        except TimeoutError:
            raise AssertionError(f"no {marker!r} within {READ_S}s; got {got!r}") from None
        assert isinstance(msg, bytes), f"a control message before {marker!r}: {msg}; got {got!r}"
        got += msg[1:] if prefixed else msg
    return got


def size_shows(ws: ClientConnection, size: bytes) -> bool:
    """Whether ``stty size`` shows ``size`` within READ_S seconds.

    runc gives the container's terminal the size of its own once the command
    started, and again when its SIGWINCH arrives: each asynchronously, so it
    is asked again until it shows (each answer read to its marker).
    """
    deadline, n = time.monotonic() + READ_S, 10
    while time.monotonic() < deadline:
        n += 1
        ws.send(f"stty size; echo hws-$(({n}-1))\n".encode())
        if size in read_until(ws, f"hws-{n - 1}\r".encode(), prefixed=True):
            return True
    return False


def finish(ws: ClientConnection, prefixed: bool = True) -> tuple[dict[int, bytes], Any]:
    """The rest of the output by stream, and the final control message."""
    out: dict[int, bytes] = {1: b"", 2: b""}
    while True:
        msg = ws.recv(timeout=READ_S)
        if isinstance(msg, str):
            return out, json.loads(msg)
        if prefixed:
            out[msg[0]] += msg[1:]
        else:
            out[1] += msg


def audit(server: Server, op: str, target: str = CT) -> list[dict[str, Any]]:
    """The audit records of ``op`` on ``target`` (the container), oldest first."""
    records = server.client().get("/1.0/audit", params={"target": target}).json()
    return [r for r in records if r["op"] == op]


def test_console_round_trip_and_detach(server: Server) -> None:
    before = len(audit(server, "session.console"))
    with server.ws(f"/1.0/instances/{CT}/console", rows=30, cols=100) as ws:
        if CURSOR_QUERY in read_until(ws, b"# "):  # busybox's line editing asks first
            ws.send(CURSOR_REPLY)
        ws.send(b"echo hws-$((6*7))\n")
        assert b"hws-42" in read_until(ws, b"hws-42")
        ws.send(json.dumps({"type": "detach"}))
        _, last = finish(ws, prefixed=False)
        assert last == {"type": "detached"}
    assert popek_json("info", CT)["state"] == "running"
    records = audit(server, "session.console")[before:]
    assert [r["result"] for r in records] == ["started", "ok"], records
    assert records[0]["identity"] == records[1]["identity"]


def terminal_session(server: Server, name: str, ctrl_c: bool = False) -> None:
    """An exec of a shell on a terminal of ``name``: of the size asked, resized, its exit
    code back, audited (``ctrl_c``: the key ends the foreground command only)."""
    with server.ws(f"/1.0/instances/{name}/exec", command=["/bin/sh"], rows=33, cols=101) as ws:
        ws.send(b"tty; echo hws-$((1+1))\n")  # the echo of the line differs from its output
        assert b"/dev/pts/" in read_until(ws, b"hws-2\r", prefixed=True)
        assert size_shows(ws, b"33 101")
        ws.send(json.dumps({"type": "resize", "rows": 50, "cols": 132}))
        assert size_shows(ws, b"50 132")
        if ctrl_c:  # once the command reads the terminal (its answer shows: it is foreground)
            ws.send(b"tr a-z A-Z; echo hws-$((2+2))\n")
            ws.send(b"hws-typed\n")
            read_until(ws, b"HWS-TYPED", prefixed=True)
            ws.send(b"\x03")
            # the prompt again, whose line editor asks where the cursor is: answered, or the
            # next line typed would be taken for the answer
            got = read_until(ws, b"# ", prefixed=True)
            if CURSOR_QUERY not in got:
                read_until(ws, CURSOR_QUERY, prefixed=True)
            ws.send(CURSOR_REPLY)
            ws.send(b"echo hws-$((3+3))\n")
            got = read_until(ws, b"hws-6\r", prefixed=True)
            assert b"hws-4" not in got, got
        ws.send(b"exit 7\n")
        _, last = finish(ws)
        assert last == {"type": "exit", "exit_code": 7}
    records = audit(server, "session.exec", name)
    assert records[-1]["result"] == "ok" and "tty=true" in records[-1]["change"], records[-1]


def test_exec_with_a_terminal(server: Server) -> None:
    terminal_session(server, CT)


def test_exec_without_a_terminal_keeps_the_streams_apart(server: Server) -> None:
    with server.ws(f"/1.0/instances/{CT}/exec", tty="false",
                   command=["/bin/sh", "-c", "cat; echo hws-err >&2; exit 3"]) as ws:
        ws.send(b"hws-in\n")
        ws.send(json.dumps({"type": "eof"}))
        out, last = finish(ws)
    assert out == {1: b"hws-in\n", 2: b"hws-err\n"}
    assert last == {"type": "exit", "exit_code": 3}


def test_refusals_before_the_upgrade(server: Server) -> None:
    with pytest.raises(InvalidStatus) as err:
        server.ws("/1.0/instances/hws-none/console")
    assert err.value.response.status_code == 404
    with pytest.raises(InvalidStatus) as err:
        server.ws(f"/1.0/instances/{CT}/exec")  # no command
    assert err.value.response.status_code == 400
    assert json.loads(err.value.response.body or b"{}")["error"]["field"] == "command"
    with pytest.raises(InvalidStatus) as err:
        server.ws(f"/1.0/instances/{CT}/console", rows="0")
    assert err.value.response.status_code == 400


def test_the_console_grant(server: Server) -> None:
    from popek.core.auth import Tokens
    from popek.state import open_store

    tokens = Tokens(open_store())
    _, plain = tokens.create("default", "operator", name="hws-plain")
    _, granted = tokens.create("default", "operator", console=True, name="hws-console")
    for path, query in ((f"/1.0/instances/{CT}/console", {}),
                        (f"/1.0/instances/{CT}/exec", {"command": ["true"]})):
        with pytest.raises(InvalidStatus) as err:
            server.wss(path, plain, **query)
        assert err.value.response.status_code == 403
        assert json.loads(err.value.response.body or b"{}")["error"]["code"] == "denied"
    for op in ("session.console", "session.exec"):
        last = audit(server, op)[-1]
        assert last["result"].startswith("denied") and "hws-plain" in last["identity"], last
    with pytest.raises(InvalidStatus) as err:
        server.wss(f"/1.0/instances/{CT}/console", "pk1.000000000000.forged")
    assert err.value.response.status_code == 401
    with server.wss(f"/1.0/instances/{CT}/exec", granted, command=["/bin/sh", "-c", "exit 0"],
                    tty="false") as ws:
        _, last = finish(ws)
    assert last == {"type": "exit", "exit_code": 0}
    assert "hws-console" in audit(server, "session.exec")[-1]["identity"]


class Terminal:
    """A ``popek`` command on a pseudo-terminal of its own (its stdin, stdout and stderr)."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        import pty

        self.master, slave = pty.openpty()
        self.proc = subprocess.Popen([sys.executable, "-m", "popek", *args], stdin=slave,
                                     stdout=slave, stderr=slave, env=env,
                                     start_new_session=True)
        os.close(slave)
        self.got = b""

    def read_until(self, marker: bytes) -> bytes:
        """What it wrote up to ``marker`` (or its end), within READ_S seconds."""
        import select

        deadline = time.monotonic() + READ_S
        while marker not in self.got:
            left = deadline - time.monotonic()
            assert left > 0, f"no {marker!r} within {READ_S}s: {self.got!r}"
            if select.select([self.master], [], [], left)[0]:
                try:
                    data = os.read(self.master, 4096)
                except OSError:  # EIO: the command ended
                    data = b""
                if not data:
                    break
                self.got += data
        return self.got

    def close(self) -> int:
        """Its exit code, once its output was read to the end."""
        self.read_until(b"\0never\0") if self.proc.poll() is None else None
        code = self.proc.wait(timeout=READ_S)
        os.close(self.master)
        return code


def _client_env(tmp: Path) -> dict[str, str]:
    return {**os.environ, "POPEK_HOME": str(tmp / "home"), "XDG_CONFIG_HOME": str(tmp / "cfg"),
            "POPEK_CLI_SERVER": "off"}


def test_cli_console_and_exec_on_a_remote(server: Server, tmp_path: Path) -> None:
    """``popek console hws:NAME`` and ``popek exec hws:NAME`` on a terminal use the websockets."""
    env = _client_env(tmp_path)
    secret = popek("token", "create", "--project", "default", "--role", "operator",
                   "--console", "--name", "hws-cli").stdout.splitlines()[-1].strip()
    url = f"https://127.0.0.1:{server.port}"
    popek("remote", "add", "hws", url, "--token", secret, "--accept-certificate", env=env)

    term = Terminal(["exec", f"hws:{CT}", "--", "/bin/sh", "-c", "tty; exit 5"], env)
    assert b"/dev/pts/" in term.read_until(b"/dev/pts/")
    assert term.close() == 5

    term = Terminal(["console", f"hws:{CT}"], env)
    # keys typed before the client made its terminal raw would be the line discipline's
    wait_state(lambda: not termios.tcgetattr(term.master)[3] & termios.ICANON, term.proc.pid,
               READ_S, "popek console to make its terminal raw")
    if CURSOR_QUERY in term.read_until(b"# "):  # busybox's line editing asks first
        os.write(term.master, CURSOR_REPLY)
    os.write(term.master, b"echo hws-$((6*7))\r")
    term.read_until(b"hws-42")
    os.write(term.master, b"\x1d")
    assert b"Detached." in term.read_until(b"Detached.")
    assert term.close() == 0
    assert popek_json("info", CT)["state"] == "running"
    last = audit(server, "session.console")[-1]
    assert last["result"] == "ok" and "hws-cli" in last["identity"], last


def test_cli_console_without_the_grant(server: Server, tmp_path: Path) -> None:
    env = _client_env(tmp_path)
    secret = popek("token", "create", "--project", "default", "--role", "operator",
                   "--name", "hws-nogrant").stdout.splitlines()[-1].strip()
    popek("remote", "add", "hws", f"https://127.0.0.1:{server.port}", "--token", secret,
          "--accept-certificate", env=env)
    term = Terminal(["console", f"hws:{CT}"], env)
    out = term.read_until(b"\n")
    assert term.close() == 4, out  # denied
    assert b"console" in out and b"Traceback" not in out, out
    last = audit(server, "session.console")[-1]
    assert last["result"].startswith("denied") and "hws-nogrant" in last["identity"], last


VM = "hws-vm"


def test_a_vm_console_and_exec(server: Server, minimal_image: str) -> None:
    """A VM's serial console through the websocket; its exec through the agent, no terminal."""
    popek("launch", minimal_image, VM, "--memory", "256MiB")
    try:
        with server.ws(f"/1.0/instances/{VM}/console") as ws:
            ws.send(b"\r")  # a prompt again: the boot's output came before the session
            if CURSOR_QUERY in read_until(ws, b"# "):
                ws.send(CURSOR_REPLY)
            ws.send(b"echo hws-vm-$((6*7))\r")
            read_until(ws, b"hws-vm-42")
            ws.send(json.dumps({"type": "detach"}))
            _, last = finish(ws, prefixed=False)
            assert last == {"type": "detached"}
        with server.ws(f"/1.0/instances/{VM}/exec", tty="false",
                       command=["sh", "-c", "echo out; echo err >&2; exit 6"]) as ws:
            out, last = finish(ws)
        assert out == {1: b"out\n", 2: b"err\n"} and last == {"type": "exit", "exit_code": 6}
        terminal_session(server, VM, ctrl_c=True)  # the guest agent's own terminal
        _vm_exec_on_the_cli_terminal()
        assert popek_json("info", VM)["state"] == "running"
    finally:
        popek("delete", "--force", VM, check=False)


def _vm_exec_on_the_cli_terminal() -> None:
    """``popek exec VM`` from a terminal: the guest's terminal, its exit code back."""
    env = {**os.environ, "POPEK_CLI_SERVER": "off"}
    term = Terminal(["exec", VM, "--", "/bin/sh", "-c", "tty; stty size; exit 5"], env)
    got = term.read_until(b"\n24 80")
    assert b"/dev/pts/" in got, got
    assert term.close() == 5
