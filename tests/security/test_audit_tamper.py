"""Tampering with the audit log: every edit, removal, insertion, reordering or cut is reported.

The threat (survey, section V): an administrator or intruder who hides what
was done on the host.  The log is a hash chain; checkpoints of its head are
signed with the host's audit key and the head is also kept in the state
store, so even a consistent rewrite of the whole tail is detected.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from framework import Home
from popek.trust.audit import record_hash
from popek.trust.keys import canonical


@pytest.fixture(scope="module")
def home(popek_home: Path) -> Iterator[Home]:
    h = Home(popek_home, images=())
    # real commands write real records (and the 32nd record a signed checkpoint)
    for i in range(34):
        h.popek("trust", "allow-unsigned", "--project", f"p{i}", *(["--off"] if i % 2 else []))
    yield h
    h.close()


def _log(home: Home) -> Path:
    return home.path / "audit" / "log.jsonl"


def _tampered(home: Home, change: Callable[[list[bytes]], list[bytes]]) -> str:
    log = _log(home)
    original = log.read_bytes()
    try:
        lines = original.splitlines()
        log.write_bytes(b"\n".join(change(lines)) + b"\n")
        proc = home.popek("audit", "verify", check=False)
        assert proc.returncode == 3, proc.stdout + proc.stderr  # tampered (README: exit codes)
        return proc.stdout
    finally:
        log.write_bytes(original)


def _rechain(recs: list[dict[str, object]], start: int) -> list[bytes]:
    """What a careful forger does: recompute every hash from ``start`` on."""
    for i in range(start, len(recs)):
        recs[i]["prev"] = recs[i - 1]["hash"] if i else "0" * 64
        recs[i]["seq"] = i + 1
        recs[i]["hash"] = record_hash(recs[i])
    return [canonical(r) for r in recs]


def test_intact_log_verifies(home: Home) -> None:
    proc = home.popek("audit", "verify")
    assert "intact" in proc.stdout
    assert (home.path / "audit" / "checkpoints.jsonl").read_text().count("\n") >= 1
    ops = {r["op"] for r in json.loads(home.popek("audit", "log", "--format", "json").stdout)}
    assert "trust.allow-unsigned" in ops


def test_edited_record_detected(home: Home) -> None:
    def edit(lines: list[bytes]) -> list[bytes]:
        lines[5] = lines[5].replace(b'"result":"ok"', b'"result":"error: nothing"')
        return lines
    assert "edited" in _tampered(home, edit)


def test_deleted_record_detected(home: Home) -> None:
    assert "removed" in _tampered(home, lambda ls: ls[:10] + ls[11:])


def test_inserted_record_detected(home: Home) -> None:
    def insert(lines: list[bytes]) -> list[bytes]:
        fake = json.loads(lines[3])
        fake["target"] = "an alibi"
        fake["hash"] = record_hash(fake)
        return [*lines[:4], canonical(fake), *lines[4:]]
    assert "inserted" in _tampered(home, insert)


def test_reordered_records_detected(home: Home) -> None:
    def swap(lines: list[bytes]) -> list[bytes]:
        lines[7], lines[8] = lines[8], lines[7]
        return lines
    assert "reordered" in _tampered(home, swap)


def test_truncated_tail_detected(home: Home) -> None:
    out = _tampered(home, lambda ls: ls[:-2])  # after the last signed checkpoint
    assert "cut off" in out


def test_consistent_rewrite_of_the_tail_detected(home: Home) -> None:
    """Every hash recomputed from record 5 on: the chain is whole, the signed head is not."""
    def rewrite(lines: list[bytes]) -> list[bytes]:
        recs = [json.loads(x) for x in lines]
        recs[4]["actor"] = "nobody"
        return _rechain(recs, 4)
    out = _tampered(home, rewrite)
    assert "rewritten" in out
    assert "edited" not in out and "removed" not in out  # the chain itself looks fine


def test_rewrite_after_deleting_checkpoints_detected(home: Home) -> None:
    cps = home.path / "audit" / "checkpoints.jsonl"
    saved = cps.read_bytes()
    cps.unlink()
    try:
        def rewrite(lines: list[bytes]) -> list[bytes]:
            recs = [json.loads(x) for x in lines]
            recs[-1]["result"] = "ok"
            recs[-1]["target"] = "elsewhere"
            return _rechain(recs, len(recs) - 1)
        assert "rewritten" in _tampered(home, rewrite)
    finally:
        cps.write_bytes(saved)
