"""The ``popek`` command's front: hand the command to a warm command server, or run it here.

A new Python process pays for its interpreter and for importing popek before
any work starts: about 150 ms of a 250 ms container launch on a slow host.
:mod:`popek.cli.cmdserver` keeps one interpreter with popek imported and forks
it for each command (Mercurial's ``chg`` does the same for ``hg``).  This
module is the client side, kept to built-in modules so that it costs little
more than the interpreter's start:

* it connects to the server's socket, passes its own stdin, stdout and stderr
  (``SCM_RIGHTS``), its argv, working directory, umask and environment, and forwards
  SIGINT, SIGTERM, SIGHUP and SIGQUIT to the forked child;
* the child runs exactly the code an in-process command runs, writing to the
  client's own descriptors, and reports its exit code, which the client exits
  with;
* when there is no server (or it is stale, or refuses), the command runs in
  this process as before, and, for root, a server is started for the next
  command.  It exits on its own after ``IDLE_S`` without a command.

Whatever answers on the socket must run as root (``SO_PEERCRED``) before the
client sends it anything: an impostor listener (``POPEK_CLI_SOCKET`` pointing
at a user's socket) gets no environment and no terminal, and cannot make the
client signal a pid or exit with a code of its choosing: the client refuses
with one line and exit code 3 (a trust check).  A pid is only ever taken from
such a verified server, and only a real one (above 1).

``POPEK_CLI_SERVER=off`` turns all of it off; ``POPEK_CLI_SOCKET`` names
another socket than this installation's (``/run/popek/cli-<crc32 of its
directory>.sock``: two installations on one host never run each other's
code).  Interactive commands (``console`` without ``--log``, ``exec`` on a
terminal) and ``command-server`` itself always run in-process: they need the
terminal's signals and job control.
"""

from __future__ import annotations

import _signal  # type: ignore[import-not-found]  # signal itself imports enum: 6 ms
import _socket
import os
import sys
import zlib

RUN_DIR = "/run/popek"
#: this installation's directory: the one that holds the popek package
PACKAGE = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
#: one server per installation: a server runs the code of the popek it was started from
SOCKET = f"{RUN_DIR}/cli-{zlib.crc32(os.fsencode(PACKAGE)):08x}.sock"
MAGIC = b"popek-cmd/1"
ENV_SWITCH = "POPEK_CLI_SERVER"
ENV_SOCKET = "POPEK_CLI_SOCKET"
FORWARDED = (_signal.SIGINT, _signal.SIGTERM, _signal.SIGHUP, _signal.SIGQUIT)
#: run in the popek process: a long-lived server, an events stream
LOCAL_COMMANDS = ("command-server", "serve", "monitor")
#: a shell's completion request (see popek.cli.completion)
COMPLETE_VAR = "_POPEK_COMPLETE"
#: run in-process too: Typer's completion options find the user's shell among the
#: command's parent processes, which in the server are the server's, not the shell
LOCAL_OPTIONS = ("--help", "--install-completion", "--show-completion")


def main() -> None:
    """Entry point of the ``popek`` launcher: remote when possible, else in-process."""
    args = sys.argv[1:]
    switch = os.environ.get(ENV_SWITCH, "on")
    if switch != "off" and os.geteuid() == 0 and remote_allowed(args, _tty(),
                                                                COMPLETE_VAR in os.environ):
        code = run_remote(args)
        if code is not None:
            os._exit(code)
        spawn_server()
    run_local(args)


def _tty() -> bool:
    return os.isatty(0) and os.isatty(1)


def remote_allowed(args: list[str], tty: bool, completing: bool = False) -> bool:
    """Say whether ``args`` may run in the command server (not interactive commands).

    ``tty``: the caller's stdin and stdout are terminals.  The server asks the
    same question of the descriptors it receives (the native client has no
    rules of its own).  ``completing``: a shell's completion request (its
    words are in the environment, ``args`` is empty): answered by the server.
    """
    if completing and not args:
        return True
    words = [a for a in args if not a.startswith("-")]
    if not words or words[0] in LOCAL_COMMANDS or any(a in LOCAL_OPTIONS for a in args):
        return False
    if words[0] == "console":
        return "--log" in args
    if words[0] == "exec":  # a terminal session when stdin and stdout are terminals
        head = args[:args.index("--")] if "--" in args else args
        no_tty = any(a == "--no-tty" or (a[:1] == "-" and a[1:2] != "-" and "T" in a)
                     for a in head)
        return no_tty or not tty
    return True


def run_local(args: list[str]) -> None:
    """Run the command in this process (the launcher may have skipped ``site``)."""
    if sys.flags.no_site and "site" not in sys.modules:
        import site

        site.main()
    from popek.cli.entry import main as entry_main

    entry_main(args)


def socket_path() -> str:
    """The server's socket: ``$POPEK_CLI_SOCKET``, or this installation's in ``/run/popek``."""
    return os.environ.get(ENV_SOCKET) or SOCKET


def encode(args: list[str]) -> bytes:
    """The request: magic, working directory, umask (octal), argc, argv, ``KEY=VALUE``s."""
    env = [k + b"=" + v for k, v in os.environb.items()]
    mask = os.umask(0o077)
    os.umask(mask)
    fields = [MAGIC, os.getcwdb(), b"%o" % mask, str(len(args)).encode(),
              *map(os.fsencode, args), *env]
    return b"\0".join(fields)


#: the exit code of a refused server: a trust check failed (as popek.trust's TrustError)
REFUSED = 3


def peer_uid(sock: _socket.socket) -> int:
    """The uid of the process that listens at the other end of ``sock`` (``SO_PEERCRED``)."""
    cred = sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, 12)  # pid, uid, gid
    return int.from_bytes(cred[4:8], sys.byteorder)


def run_remote(args: list[str], path: str | None = None) -> int | None:
    """Run ``args`` in the command server; ``None`` when there is none to take it.

    A listener that does not run as root is refused before anything is sent
    to it: one line on stderr and :data:`REFUSED`.
    """
    path = path or socket_path()
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        sock.connect(path)
        uid = peer_uid(sock)
        if uid != 0:
            print(f"popek: refused the command socket {path}: it is served by uid {uid}, "
                  "not root; nothing was sent (unset POPEK_CLI_SOCKET, or set "
                  "POPEK_CLI_SERVER=off)", file=sys.stderr)
            return REFUSED
        fds = (0, 1, 2)
        rights = b"".join(fd.to_bytes(4, sys.byteorder) for fd in fds)
        sock.sendmsg([encode(args)], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, rights)])
        sock.shutdown(_socket.SHUT_WR)
        return _await(sock)
    except OSError:
        return None
    finally:
        sock.close()


def _await(sock: _socket.socket) -> int | None:
    """Read the child's pid, forward signals to it, return its exit code."""
    buffer = b""
    child = 0
    forwarded = 0

    def forward(signum: int, _frame: object) -> None:
        nonlocal forwarded
        forwarded = signum
        if child:
            os.kill(child, signum)

    while True:
        try:
            chunk = sock.recv(256)
        except OSError:
            if not child:
                raise
            chunk = b""  # once the command started it must never run a second time here
        if not chunk:
            break
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            kind, value = line[:1], _number(line[1:])
            if kind == b"P" and not child and value is not None and value > 1:
                child = value  # a command of the verified server: never 0, 1 or a group
                for signum in FORWARDED:
                    _signal.signal(signum, forward)
            elif kind == b"X" and child and value is not None and 0 <= value <= 255:
                return value
            elif not child:  # stale or refused before it started: run it here
                return None
        if len(buffer) > 64:  # a line longer than any the protocol has
            buffer = b""
    if not child:
        return None
    # the child ended without a code: killed by a signal we forwarded, or by another
    print("popek: the command ended without an exit code", file=sys.stderr)
    return 128 + forwarded if forwarded else 1


def _number(text: bytes) -> int | None:
    """``text`` as a decimal number, or ``None`` when it is not one."""
    return int(text) if 0 < len(text) <= 10 and text.isdigit() else None


def spawn_server() -> None:
    """Start a command server in its own session for the next command (best effort)."""
    try:
        null = os.open(os.devnull, os.O_RDWR)
        try:
            actions = [(os.POSIX_SPAWN_DUP2, null, fd) for fd in (0, 1, 2)]
            env = {k: v for k, v in os.environ.items()
                   if k in ("PATH", "LANG", "LC_ALL", ENV_SOCKET)}
            os.posix_spawn(sys.executable, [sys.executable, "-I", "-m", "popek.cli.cmdserver"],
                           env, file_actions=actions, setsid=True)
        finally:
            os.close(null)
    except (OSError, ValueError):  # no server then: commands run in-process
        pass


def launcher(python: str, source: str) -> str:
    """The text of a ``popek`` launcher that starts the interpreter without ``site``.

    ``site`` (and the ``re`` import of pip's console-script wrapper) costs about
    20 ms here; the launcher puts popek's own directory on ``sys.path`` and
    imports ``site`` only when the command runs in-process.  Isolated (``-I``),
    as the command server: ``PYTHONPATH``, ``PYTHONSTARTUP`` and the other
    ``PYTHON*`` variables of the caller, the user's site directory and the
    working directory never put code into a root command.
    """
    return (f"#!{python} -IS\n"
            f"import sys\n"
            f"sys.path.insert(0, {source!r})\n"
            f"from popek.cli.client import main\n"
            f"main()\n")


def install(target: str) -> str:
    """Install the ``popek`` command at ``target``: the native client, else the launcher.

    The native client (client.c, built with the system's C compiler) starts in
    about a millisecond; where it cannot be built, the Python launcher does
    the same job about 20 ms slower.  Returns which one was installed.
    """
    import subprocess

    source = os.path.join(os.path.dirname(os.path.abspath(__file__)), "client.c")
    new = target + ".new"
    try:
        subprocess.run(["cc", "-O2", "-Wall", "-Wextra", "-Werror",
                        f'-DPOPEK_PYTHON="{sys.executable}"', f'-DPOPEK_SRC="{PACKAGE}"',
                        f'-DPOPEK_SOCKET="{SOCKET}"',
                        "-o", new, source], check=True, capture_output=True)
        kind = "native"
    except (OSError, subprocess.CalledProcessError):
        with open(new, "w") as out:
            out.write(launcher(sys.executable, PACKAGE))
        os.chmod(new, 0o755)
        kind = "python"
    os.replace(new, target)
    return kind


if __name__ == "__main__":  # python -m popek.cli.client TARGET: install the popek command
    print(f"popek command at {sys.argv[1]}: {install(sys.argv[1])} client")
