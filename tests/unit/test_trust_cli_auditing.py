"""Which popek commands go to the audit log, and as what (cli.auditing.describe, no root)."""

from __future__ import annotations

from collections.abc import Iterator

import click
import pytest
import typer

from popek.cli.auditing import READ_ONLY, SESSIONS, describe
from popek.cli.main import app


@pytest.fixture(scope="module")
def root() -> click.Command:
    return typer.main.get_command(app)


def leaves(cmd: click.Command, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    if isinstance(cmd, click.Group):
        ctx = click.Context(cmd)
        for name in cmd.list_commands(ctx):
            sub = cmd.get_command(ctx, name)
            assert sub is not None
            yield from leaves(sub, (*path, name))
    else:
        yield path


@pytest.mark.parametrize("argv", [
    ["list"], ["list", "--format", "json"], ["info", "vm1"], ["config", "show", "vm1"],
    ["image", "list"], ["image", "info", "minimal"], ["network", "list"],
    ["network", "info", "net1"], ["trust", "list"], ["trust", "export", "k1"],
    ["policy", "show"], ["policy", "check", "p.toml"], ["audit", "log", "--target", "vm1"],
    ["audit", "verify"], ["sandbox", "profiles"], ["console", "vm1", "--log"],
    ["attest", "verify", "q.json", "--nonce", "00" * 16, "--expect", "q.json"],
])
def test_read_only_commands_are_not_audited(root: click.Command, argv: list[str]) -> None:
    assert describe(root, argv) is None


@pytest.mark.parametrize("argv", [
    [], ["--help"], ["launch", "--help"], ["network", "create", "net1", "--help"],
    ["network"], ["trust"], ["no-such-command", "x"], ["network", "nope", "x"],
])
def test_help_groups_and_unknown_commands_are_not_audited(root: click.Command,
                                                          argv: list[str]) -> None:
    assert describe(root, argv) is None


@pytest.mark.parametrize(("argv", "want"), [
    (["launch", "minimal", "web1"], ("instance.launch", "web1")),
    (["launch", "--vcpus", "2", "--memory", "1GiB", "minimal", "web1", "--label", "db"],
     ("instance.launch", "web1")),
    (["launch", "minimal", "web1", "--container", "--network", "net1"],
     ("instance.launch", "web1")),
    (["start", "vm1"], ("instance.start", "vm1")),
    (["stop", "vm1"], ("instance.stop", "vm1")),
    (["restart", "vm1"], ("instance.restart", "vm1")),
    (["pause", "vm1"], ("instance.pause", "vm1")),
    (["resume", "vm1"], ("instance.resume", "vm1")),
    (["delete", "vm1", "--force"], ("instance.delete", "vm1")),
    (["network", "create", "net1", "--subnet", "10.9.0.0/24", "--nat"],
     ("network.create", "net1")),
    (["network", "delete", "net1"], ("network.delete", "net1")),
    (["network", "attach", "net1", "vm1"], ("network.attach", "net1")),
    (["network", "detach", "net1", "vm1"], ("network.detach", "net1")),
    (["config", "set", "vm1"], ("config.set", "vm1")),
    (["image", "delete", "minimal"], ("image.delete", "minimal")),
    (["image", "sign", "minimal", "--key", "k1"], ("image.sign", "minimal")),
    (["trust", "keygen", "k1", "--role", "image"], ("trust.keygen", "k1")),
    (["trust", "add", "k.pem", "--name", "k1", "--role", "image"], ("trust.add", "k.pem")),
    (["trust", "remove", "k1"], ("trust.remove", "k1")),
    (["trust", "revoke", "k1", "--reason", "stolen"], ("trust.revoke", "k1")),
    (["policy", "apply", "p.toml"], ("policy.apply", "p.toml")),
    (["audit", "checkpoint"], ("audit.checkpoint", "")),
    # a backup holds the private keys: taking one is audited like a change
    (["admin", "backup", "/root/b.tar.gz"], ("admin.backup", "/root/b.tar.gz")),
    (["admin", "restore", "/root/b.tar.gz", "--force"], ("admin.restore", "/root/b.tar.gz")),
    (["sandbox", "run", "--", "ls", "-l"], ("sandbox.run", "ls -l")),
    (["console", "vm1"], ("session.console", "vm1")),
    (["exec", "vm1", "--", "id"], ("session.exec", "vm1")),
    (["attest", "vm1", "--nonce", "ab" * 16], ("session.attest", "vm1")),
])
def test_mutating_commands_and_sessions(root: click.Command, argv: list[str],
                                        want: tuple[str, str]) -> None:
    assert describe(root, argv) == want


def test_relaxing_a_project_is_audited_naming_the_project(root: click.Command) -> None:
    what = describe(root, ["trust", "allow-unsigned", "--project", "lab"])
    assert what is not None and what[0] == "trust.allow-unsigned"
    assert "lab" in what[1]


def test_launch_target_is_the_instance_not_the_image(root: click.Command) -> None:
    what = describe(root, ["launch", "debian", "db1"])
    assert what is not None
    assert what[1] == "db1" and "debian" not in what[1]


def test_a_bad_command_line_is_still_audited(root: click.Command) -> None:
    # the command fails to parse, but the attempt is recorded
    incomplete = describe(root, ["launch", "minimal"])
    assert incomplete is not None and incomplete[0] == "instance.launch"
    bogus = describe(root, ["network", "create", "net1", "--bogus"])
    assert bogus is not None and bogus[0] == "network.create"
    assert describe(root, ["start"]) == ("instance.start", "")


def test_every_command_is_audited_unless_read_only(root: click.Command) -> None:
    paths = {".".join(p) for p in leaves(root)}
    assert {"launch", "network.create", "trust.revoke", "policy.apply"} <= paths
    for op in sorted(paths):
        what = describe(root, op.split("."))
        if op in READ_ONLY:
            assert what is None, op
        else:
            assert what is not None, op
            kind = "session" if op in SESSIONS else "instance" if "." not in op else ""
            assert what[0] == (f"{kind}.{op}" if kind else op)


def test_read_only_and_session_names_are_real_commands(root: click.Command) -> None:
    paths = {".".join(p) for p in leaves(root)}
    assert paths >= READ_ONLY
    assert paths >= SESSIONS
