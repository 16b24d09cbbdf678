"""Mandatory access control between instances: the policy's denials hold.

The threat (survey, section V): guests that must never meet sharing a host or
a network.  Labels, Chinese Wall conflict sets and share rules decide at
launch, start and network attach; each decision is audited; a tampered
stored policy refuses everything rather than being skipped.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from framework import Home

CTR = ["--container", "--memory", "128MiB"]
POLICY = """\
version = {version}
mode = "{mode}"
labels = ["default", "bank-a", "bank-b", "web", "db", "files"]

[[conflict]]
name = "banks"
labels = ["bank-a", "bank-b"]

[[share]]
kind = "network"
labels = ["web", "db"]

[[share]]
kind = "network"
labels = ["bank-a"]

[[share]]
kind = "channel"
labels = ["files"]
"""


@pytest.fixture(scope="module")
def home(popek_home: Path, minimal_image: str) -> Iterator[Home]:
    h = Home(popek_home)
    h.popek("image", "sign", "minimal")
    h.popek("network", "create", "macnet")
    yield h
    for name in h.instances():
        h.popek("delete", "--force", name, check=False)
    h.popek("network", "delete", "--force", "macnet", check=False)
    h.close()


_version = [0]


def _apply(home: Home, mode: str = "enforcing") -> None:
    _version[0] += 1
    home.popek("policy", "apply", "-",
               stdin=POLICY.format(version=_version[0], mode=mode).encode())


@pytest.fixture()
def enforcing(home: Home) -> Iterator[None]:
    _apply(home)
    yield
    for name in home.instances():
        home.popek("delete", "--force", name, check=False)


def _denied(proc: subprocess.CompletedProcess[str], why: str) -> None:
    rc, err = proc.returncode, proc.stderr
    assert rc == 4, (rc, err)
    assert "denies" in err and why in err, err


def test_conflicting_labels_cannot_run_together(home: Home, enforcing: None) -> None:
    home.popek("launch", "minimal", "a1", *CTR, "--label", "bank-a")
    _denied(home.popek("launch", "minimal", "b1", *CTR, "--label", "bank-b", check=False),
            "conflicts with running label 'bank-a'")
    assert "b1" not in home.instances()
    home.popek("stop", "a1")
    home.popek("launch", "minimal", "b1", *CTR, "--label", "bank-b")
    # and the wall works both ways, at start too
    _denied(home.popek("start", "a1", check=False), "conflicts with running label 'bank-b'")


def test_racing_conflicting_launches_never_both_run(home: Home, enforcing: None) -> None:
    """Two conflicting launches at the same moment: one runs, the other is denied."""
    import subprocess as sp

    from framework import POPEK

    procs = [sp.Popen([*POPEK, "launch", "minimal", name, *CTR, "--label", label],
                      env=home.env, stdout=sp.PIPE, stderr=sp.PIPE, text=True)
             for name, label in (("race-a", "bank-a"), ("race-b", "bank-b"))]
    codes = sorted(p.wait(timeout=120) for p in procs)
    errors = "".join(p.stderr.read() for p in procs if p.stderr)
    assert codes == [0, 4], errors
    assert "conflicts with running label" in errors
    assert len([n for n in home.instances() if n.startswith("race-")]) == 1


def test_forbidden_network_share_refused(home: Home, enforcing: None) -> None:
    home.popek("launch", "minimal", "w1", *CTR, "--label", "web", "--network", "macnet")
    home.popek("launch", "minimal", "d1", *CTR, "--label", "db", "--network", "macnet")
    _denied(home.popek("launch", "minimal", "x1", *CTR, "--label", "bank-a",
                       "--network", "macnet", check=False),
            "may not share network macnet with label")
    home.popek("launch", "minimal", "x2", *CTR, "--label", "bank-a")
    _denied(home.popek("network", "attach", "macnet", "x2", check=False),
            "may not share network macnet")
    ports = json.loads(home.popek("info", "x2", "--format", "json").stdout)["ports"]
    assert ports == []


def test_host_channel_needs_a_grant(home: Home, enforcing: None, tmp_path: Path) -> None:
    share = Path("/var/tmp") / f"mac-share-{tmp_path.name}"
    share.mkdir(exist_ok=True)
    try:
        _denied(home.popek("launch", "minimal", "m1", *CTR, "--mount", f"{share}:/mnt",
                           check=False), "may not use host channels")
        home.popek("launch", "minimal", "m2", *CTR, "--label", "files",
                   "--mount", f"{share}:/mnt")
    finally:
        share.rmdir()


def test_undeclared_label_refused(home: Home, enforcing: None) -> None:
    _denied(home.popek("launch", "minimal", "u1", *CTR, "--label", "intruder", check=False),
            "not declared")


def test_label_cannot_change_while_running(home: Home, enforcing: None) -> None:
    home.popek("launch", "minimal", "l1", *CTR, "--label", "web")
    proc = home.popek("config", "set", "l1", "label", "bank-a", check=False)
    assert proc.returncode != 0 and "stopped" in proc.stderr
    home.popek("stop", "l1")
    home.popek("config", "set", "l1", "label", "db")
    assert json.loads(home.popek("info", "l1", "--format", "json").stdout)["label"] == "db"


def test_permissive_mode_logs_what_it_would_deny(home: Home) -> None:
    _apply(home, "permissive")
    try:
        home.popek("launch", "minimal", "p1", *CTR, "--label", "bank-a")
        home.popek("launch", "minimal", "p2", *CTR, "--label", "bank-b")
        log = json.loads(home.popek("audit", "log", "--format", "json").stdout)
        would = [r for r in log if r["op"] == "policy.check" and
                 r["result"].startswith("would-deny") and "bank-b run" in r["target"]]
        assert would, "the denial permissive mode let through is not in the audit log"
    finally:
        for name in home.instances():
            home.popek("delete", "--force", name, check=False)


def test_every_decision_is_audited(home: Home, enforcing: None) -> None:
    home.popek("launch", "minimal", "e1", *CTR, "--label", "web")
    home.popek("launch", "minimal", "e2", *CTR, "--label", "bank-a", check=False)
    results = [r["result"].split(":")[0] for r in
               json.loads(home.popek("audit", "log", "--format", "json").stdout)
               if r["op"] == "policy.check"]
    assert "allow" in results and "deny" in results


def test_policy_version_must_increase(home: Home) -> None:
    proc = home.popek("policy", "apply", "-", check=False,
                      stdin=POLICY.format(version=0, mode="enforcing").encode())
    assert proc.returncode == 2 and "must be greater" in proc.stderr


def test_tampered_stored_policy_denies_everything(home: Home, enforcing: None) -> None:
    db = sqlite3.connect(home.path / "state.db")
    try:
        (value,) = db.execute("SELECT value FROM kv WHERE key = ?",
                              ("/popek/policy/current",)).fetchone()
        doc = json.loads(value)
        doc["text"] = doc["text"].replace('labels = ["bank-a", "bank-b"]',
                                          'labels = ["bank-a", "db"]')
        db.execute("UPDATE kv SET value = ? WHERE key = ?",
                   (json.dumps(doc).encode(), "/popek/policy/current"))
        db.commit()
    finally:
        db.close()
    proc = home.popek("launch", "minimal", "t1", *CTR, check=False)
    assert proc.returncode == 4 and "failed its check" in proc.stderr, proc.stderr
    _apply(home)  # an administrator applies a valid policy: back in business
    home.popek("launch", "minimal", "t1", *CTR)
