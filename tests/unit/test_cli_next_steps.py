"""Errors say what to do next (issue 13.5), without root.

A refused delete names ``--force`` and ``popek stop``; an exec or a console
into a stopped instance names ``popek start``; a missing image lists the
images there are and how to build one.  The console relays a stdin that is
not a terminal (``/dev/null``, a pipe) and goes on printing the console until
it closes.  ``popek attest`` tells an instance called ``verify`` from its
``verify`` sub-command by the number of words, never by the name.  The core
runs over the fake engine of ``test_core_instances``; the console over a
socket pair standing for QEMU's console socket.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from popek import errors
from popek.cli import ops
from popek.cli.main import app
from popek.core.requests import Attest
from popek.engines import Capability
from popek.engines.qemu import console
from popek.images import ImageStore
from unit.test_core_instances import Env, launch
from unit.test_images_manifest import make_image_dir


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Env:
    monkeypatch.setenv("POPEK_HOME", str(tmp_path / "home"))
    return Env(tmp_path)


def test_deleting_a_running_instance_names_force_and_stop(env: Env) -> None:
    insts = launch(env)
    with pytest.raises(errors.StateError) as exc:
        insts.delete("web")
    assert exc.value.exit_code == errors.WRONG_STATE
    assert str(exc.value) == (
        "cannot delete web: it is running; delete needs it to be one of: stopped; stop it "
        "first (popek stop web), or delete it at once: popek delete --force web")


def test_exec_and_console_into_a_stopped_instance_name_start(env: Env) -> None:
    env.engine.capabilities = env.engine.capabilities | {Capability.CONSOLE}  # type: ignore[misc]
    insts = launch(env)
    insts.stop("web")
    with pytest.raises(errors.StateError, match="; start it first: popek start web$"):
        insts.exec("web", ["true"])
    with pytest.raises(errors.StateError, match="start it first: popek start web; popek "
                                                "console web --log prints what its console"):
        insts.console("web")


def test_a_missing_image_lists_the_images_and_how_to_build_one(tmp_path: Path) -> None:
    store = ImageStore(root=tmp_path / "images", cache=tmp_path / "cache")
    with pytest.raises(errors.NotFound) as exc:
        store.get("minimal")
    assert exc.value.exit_code == errors.NOT_FOUND
    assert str(exc.value) == ("image 'minimal' not found; available: none; build it with "
                              "popek image build minimal")
    make_image_dir(tmp_path / "images", "alpha")
    with pytest.raises(errors.NotFound) as exc:
        store.get("mine")
    assert str(exc.value) == (
        "image 'mine' not found; available: alpha; build one with popek image build NAME "
        "(debian, minimal) or import one with popek image import FILE NAME")


# -- the console without a terminal -------------------------------------------------------
def _relay(stdin_fd: int, host: socket.socket, monkeypatch: pytest.MonkeyPatch,
           tmp_path: Path) -> bytes:
    """Run the console relay on ``host`` with ``stdin_fd``; return what reached stdout."""
    out = tmp_path / "stdout"
    with open(out, "wb") as stdout, os.fdopen(stdin_fd, "rb") as stdin:
        monkeypatch.setattr(sys, "stdin", stdin)
        monkeypatch.setattr(sys, "stdout", stdout)
        console._relay(host, b"\x1d")
    host.close()
    return out.read_bytes()


def test_the_console_with_stdin_at_dev_null_prints_until_it_closes(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """/dev/null cannot be polled (epoll: EPERM): it was an internal error."""
    guest, host = socket.socketpair()
    guest.sendall(b"login: ")
    guest.shutdown(socket.SHUT_WR)  # the instance stopped: its console closed
    assert _relay(os.open(os.devnull, os.O_RDONLY), host, monkeypatch, tmp_path) == b"login: "
    guest.close()


def test_the_console_sends_piped_input_then_prints_until_it_closes(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The input's end does not end the session: what the guest answers still shows."""
    guest, host = socket.socketpair()
    read, write = os.pipe()
    os.write(write, b"echo hi\n")
    os.close(write)  # the input ends at once

    def the_guest() -> None:
        got = b""
        while not got.endswith(b"\n"):
            got += guest.recv(100)
        guest.sendall(b"answer to " + got)  # sent after the input's end
        guest.shutdown(socket.SHUT_WR)

    thread = threading.Thread(target=the_guest)
    thread.start()
    out = _relay(read, host, monkeypatch, tmp_path)
    thread.join()
    guest.close()
    assert out == b"answer to echo hi\n"


def test_the_escape_byte_in_piped_input_detaches(monkeypatch: pytest.MonkeyPatch,
                                                 tmp_path: Path) -> None:
    guest, host = socket.socketpair()
    path = tmp_path / "input"
    path.write_bytes(b"ls\n\x1dnot sent")  # a regular file: sent whole, up to the escape
    assert _relay(os.open(path, os.O_RDONLY), host, monkeypatch, tmp_path) == b""
    assert guest.recv(100) == b"ls\n"
    guest.close()


# -- attest: an instance called verify ----------------------------------------------------
class FakeCore:
    def __init__(self) -> None:
        self.requests: list[Any] = []

    def handle(self, request: Any) -> dict[str, str]:
        self.requests.append(request)
        return {"quote": "q"}


@pytest.fixture
def core(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> FakeCore:
    monkeypatch.setenv("POPEK_HOME", str(tmp_path / "home"))
    fake = FakeCore()
    monkeypatch.setattr(ops, "core", lambda: fake)
    return fake


NONCE = ["--nonce", "ab" * 16]


@pytest.mark.parametrize("argv", [["verify", *NONCE], [*NONCE, "verify"]])
def test_an_instance_called_verify_is_quoted(core: FakeCore, argv: list[str]) -> None:
    res = CliRunner().invoke(app, ["attest", *argv])
    assert res.exit_code == 0, res.output
    assert core.requests == [Attest("verify", nonce="ab" * 16)]


@pytest.mark.parametrize(("argv", "says"), [
    (["verify", *NONCE, "--expect", "golden.json"], "need its file: popek attest verify QUOTE"),
    (["web", *NONCE, "--key-file", "k.pem"], "--expect and --key-file check a quote"),
    (["web", "quote.json", *NONCE], "'quote.json' is one argument too many"),
])
def test_mixed_up_attest_arguments_are_refused(core: FakeCore, argv: list[str],
                                               says: str) -> None:
    res = CliRunner().invoke(app, ["attest", *argv])
    assert isinstance(res.exception, errors.InvalidInput), res.output
    assert says in str(res.exception)
    assert core.requests == []
