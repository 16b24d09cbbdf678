"""The audit log's exact findings and its recovery paths (popek.trust.audit).

Written against the survivors of ``make mutants`` (bench/mutants.py): the
full list of problems verify() reports (not just one matching line), the
alarm kept when the tail was cut, chaining on after a garbage last line or a
deleted log, reading the last line at chunk edges, and where the files live.
"""

from __future__ import annotations

import json
import os
import pwd
import stat
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest

from popek.trust import audit
from popek.trust.audit import (
    ALARM_KEY,
    GENESIS,
    HEAD_KEY,
    AuditLog,
    checkpoints_path,
    log_path,
)
from popek.trust.keys import TrustStore, canonical

EDITED = "not a valid record ({why}): edited"


@pytest.fixture
def log(trust: TrustStore, monkeypatch: pytest.MonkeyPatch) -> AuditLog:
    monkeypatch.setattr(audit, "CHECKPOINT_EVERY", 1000)  # checkpoints only when asked
    monkeypatch.delenv("SUDO_USER", raising=False)
    return AuditLog(trust)


def fill(log: AuditLog, n: int) -> list[dict[str, Any]]:
    return [log.append("op", f"t{i}", {"i": i}, "ok") for i in range(n)]


def lines() -> list[bytes]:
    return log_path().read_bytes().splitlines()


def write_lines(ls: list[bytes]) -> None:
    log_path().write_bytes(b"".join(x + b"\n" for x in ls))


# -- where and who -------------------------------------------------------------------


def test_files_live_in_home_audit(log: AuditLog) -> None:
    home = Path(os.environ["POPEK_HOME"])
    assert log_path() == home / "audit" / "log.jsonl"
    assert checkpoints_path() == home / "audit" / "checkpoints.jsonl"
    assert stat.S_IMODE((home / "audit").stat().st_mode) == 0o700


def test_actor_names_the_user_or_the_bare_uid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SUDO_USER", raising=False)
    uid = os.geteuid()
    assert audit.actor() == f"{pwd.getpwuid(uid).pw_name} (uid {uid})"

    def unknown(_: int) -> pwd.struct_passwd:
        raise KeyError(uid)

    monkeypatch.setattr(pwd, "getpwuid", unknown)
    assert audit.actor() == f"{uid} (uid {uid})"


# -- the last line -------------------------------------------------------------------


@pytest.mark.parametrize(("data", "last"), [
    (b"", b""),
    (b"x", b"x"),
    (b"x\n", b"x"),
    (b"a \n", b"a "),            # only the newline is stripped
    (b"one\naX\n", b"aX"),
    (b"y" * 5000 + b"\n" + b"z" * 5000 + b"\n", b"z" * 5000),  # spans two chunks
    (b"p\n" + b"q" * 4095 + b"\n", b"q" * 4095),
])
def test_last_line(data: bytes, last: bytes) -> None:
    assert audit._last_line(BytesIO(data)) == last


# -- verify's findings, complete ---------------------------------------------------


def test_a_garbage_line_in_the_middle_is_the_only_finding(log: AuditLog) -> None:
    fill(log, 3)
    ls = lines()
    write_lines([ls[0], b"garbage", ls[2]])
    assert log.verify() == [
        "line 2: " + EDITED.format(why="Expecting value: line 1 column 1 (char 0)")]


def test_a_record_with_other_fields_is_named(log: AuditLog) -> None:
    fill(log, 2)
    ls = lines()
    write_lines([ls[0], b'{"seq": 2}'])
    assert log.verify() == [
        "line 2: " + EDITED.format(why="not a record with the expected fields"),
        "record seq 2 is not the one popek wrote last: the tail was rewritten",
    ]


def test_a_removed_record_exactly(log: AuditLog) -> None:
    fill(log, 4)
    ls = lines()
    write_lines([ls[0], ls[2], ls[3]])
    assert log.verify() == [
        "line 2: sequence 3 where 2 was expected: a record was removed, inserted or reordered",
        "line 2 (seq 3): does not chain to the record before it: a record was removed, "
        "inserted, reordered or edited",
    ]


def test_records_skips_garbage_and_bad_bytes_but_not_what_follows(log: AuditLog) -> None:
    written = fill(log, 3)
    ls = lines()
    write_lines([ls[0], b"\xff\xfe not utf-8", b"[1, 2]", ls[1], ls[2]])
    assert [r["seq"] for r in log.records()] == [r["seq"] for r in written]


# -- the alarm -------------------------------------------------------------------------


def _alarm(trust: TrustStore) -> dict[str, Any]:
    kv = trust.store.get(ALARM_KEY)
    assert kv is not None
    return dict(json.loads(kv.value))


def test_an_emptied_log_raises_the_alarm_and_starts_over(log: AuditLog,
                                                         trust: TrustStore) -> None:
    fill(log, 3)
    log_path().write_bytes(b"")
    rec = log.append("op", "after", {}, "ok")
    assert (rec["seq"], rec["prev"]) == (1, GENESIS)
    alarm = _alarm(trust)
    assert (alarm["found"], alarm["expected_seq"]) == ("no record", 3)
    assert log.verify() == [
        f"on {alarm['time']} popek found the log's end at no record where it had written "
        "seq 3: the tail was cut or rewritten before later records were appended"]


def test_a_deleted_log_starts_over_at_seq_1(log: AuditLog) -> None:
    fill(log, 2)
    log_path().unlink()
    rec = log.append("op", "after", {}, "ok")
    assert (rec["seq"], rec["prev"]) == (1, GENESIS)


def test_the_first_alarm_is_kept(log: AuditLog, trust: TrustStore) -> None:
    fill(log, 4)
    write_lines(lines()[:2])             # cut two records
    log.append("op", "a", {}, "ok")      # raises the alarm: found seq 2, expected 4
    first = _alarm(trust)
    assert (first["found"], first["expected_seq"]) == ("seq 2", 4)
    write_lines(lines()[:1])             # cut again
    log.append("op", "b", {}, "ok")
    assert _alarm(trust) == first


# -- chaining on after a garbage last line ----------------------------------------


def test_after_a_garbage_last_line_the_chain_goes_on_from_the_stored_head(
        log: AuditLog) -> None:
    written = fill(log, 3)
    with log_path().open("ab") as f:
        f.write(b"garbage\n")
    rec = log.append("op", "next", {}, "ok")
    assert (rec["seq"], rec["prev"]) == (4, written[-1]["hash"])


def test_garbage_only_and_no_stored_head_starts_the_chain(log: AuditLog,
                                                          trust: TrustStore) -> None:
    log_path().write_bytes(b"garbage\n")
    assert trust.store.get(HEAD_KEY) is None
    rec = log.append("op", "first", {}, "ok")
    assert (rec["seq"], rec["prev"]) == (1, GENESIS)


# -- checkpoints: every line is checked -------------------------------------------


def test_every_checkpoint_line_is_checked(log: AuditLog) -> None:
    fill(log, 2)
    cp = log.checkpoint()
    assert cp is not None
    bad_sig = canonical({**cp, "signature": cp["signature"][::-1]})
    checkpoints_path().write_bytes(b"\n".join([bad_sig, b"garbage", bad_sig]) + b"\n")
    problems = log.verify()
    assert len(problems) == 3
    assert problems[0].startswith("checkpoint 1: ")
    assert problems[1] == "checkpoint 2: not a valid checkpoint record"
    assert problems[2].startswith("checkpoint 3: ")
    assert problems[0][len("checkpoint 1: "):] == problems[2][len("checkpoint 3: "):]
