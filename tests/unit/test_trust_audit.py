"""The hash-chained audit log: every kind of tampering is reported by verify() (no root)."""

from __future__ import annotations

import itertools
import json
import os
import stat
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from popek.trust import audit
from popek.trust.audit import (
    GENESIS,
    HEAD_KEY,
    AuditLog,
    audited,
    checkpoints_path,
    log_path,
    params_digest,
    record_hash,
)
from popek.trust.keys import TrustStore, canonical

EVERY = 4  # checkpoint interval for most tests (the default, 32, is tested on its own)


@pytest.fixture
def log(trust: TrustStore, monkeypatch: pytest.MonkeyPatch) -> AuditLog:
    monkeypatch.setattr(audit, "CHECKPOINT_EVERY", EVERY)
    return AuditLog(trust)


def fill(log: AuditLog, n: int) -> list[dict[str, Any]]:
    return [log.append(f"op.{i % 3}", f"target-{i}", {"i": i}, "ok") for i in range(n)]


def lines() -> list[bytes]:
    return log_path().read_bytes().splitlines()


def write_lines(ls: list[bytes]) -> None:
    log_path().write_bytes(b"".join(x + b"\n" for x in ls))


def recs() -> list[dict[str, Any]]:
    return [json.loads(x) for x in lines()]


def write_recs(rs: list[dict[str, Any]]) -> None:
    write_lines([canonical(r) for r in rs])


def rechain(rs: list[dict[str, Any]], start: int) -> list[dict[str, Any]]:
    """Renumber and re-hash records from index ``start`` on: a careful forger's rewrite."""
    out = [dict(r) for r in rs]
    for i in range(start, len(out)):
        out[i]["seq"] = i + 1
        out[i]["prev"] = out[i - 1]["hash"] if i else GENESIS
        out[i]["hash"] = record_hash(out[i])
    return out


def joined(problems: list[str]) -> str:
    return "\n".join(problems)


# -- appending and an intact log --------------------------------------------------------


def test_empty_log_is_intact(log: AuditLog) -> None:
    assert log.verify() == []
    assert list(log.records()) == []
    assert log.checkpoint() is None


def test_records_chain_and_intact_log_reports_nothing(log: AuditLog) -> None:
    made = fill(log, 10)
    assert [r["seq"] for r in made] == list(range(1, 11))
    assert made[0]["prev"] == GENESIS
    for before, after in itertools.pairwise(made):
        assert after["prev"] == before["hash"]
    for r in made:
        assert r["hash"] == record_hash(r)
    assert list(log.records()) == made
    assert log.verify() == []
    head = json.loads(log.trust.store.get(HEAD_KEY).value)  # type: ignore[union-attr]
    assert head == {"seq": 10, "hash": made[-1]["hash"]}


def test_record_fields_and_no_parameters_in_clear(log: AuditLog) -> None:
    rec = log.append("trust.keygen", "k1", {"password": "hunter2-secret"}, "ok")
    assert set(rec) == {"seq", "time", "actor", "op", "target", "params", "result", "prev",
                        "hash"}
    assert (rec["op"], rec["target"], rec["result"]) == ("trust.keygen", "k1", "ok")
    assert rec["params"] == params_digest({"password": "hunter2-secret"})
    assert rec["time"].endswith("Z")
    assert b"hunter2-secret" not in log_path().read_bytes()


def test_params_digest_is_canonical() -> None:
    assert params_digest({"a": 1, "b": [1, 2]}) == params_digest({"b": [1, 2], "a": 1})
    assert params_digest({"a": 1}) != params_digest({"a": 2})


def test_files_are_private(log: AuditLog) -> None:
    fill(log, EVERY)
    assert stat.S_IMODE(log_path().stat().st_mode) == 0o600
    assert stat.S_IMODE(log_path().parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(checkpoints_path().stat().st_mode) == 0o600


def test_actor_names_the_sudo_user(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SUDO_USER", raising=False)
    plain = audit.actor()
    assert plain.endswith(")") and "uid " in plain and "sudo" not in plain
    monkeypatch.setenv("SUDO_USER", "alice")
    assert audit.actor().startswith("alice via sudo as ")


def test_checkpoint_every_n_records_signed_by_the_host_audit_key(log: AuditLog) -> None:
    fill(log, 2 * EVERY + 1)
    cps = [json.loads(x) for x in checkpoints_path().read_bytes().splitlines()]
    assert [c["seq"] for c in cps] == [EVERY, 2 * EVERY]
    key = log.trust.by_name("host-audit")
    assert key.role == "audit"
    assert {c["signer"] for c in cps} == {key.id}
    rs = recs()
    assert [c["hash"] for c in cps] == [rs[EVERY - 1]["hash"], rs[2 * EVERY - 1]["hash"]]
    cp = log.checkpoint()
    assert cp is not None and cp["seq"] == 2 * EVERY + 1 and cp["hash"] == rs[-1]["hash"]
    assert len(checkpoints_path().read_bytes().splitlines()) == 3
    assert log.verify() == []


def test_default_checkpoint_interval_is_32(trust: TrustStore) -> None:
    assert audit.CHECKPOINT_EVERY == 32
    log = AuditLog(trust)
    fill(log, 31)
    assert not checkpoints_path().exists()
    fill(log, 1)
    assert [json.loads(x)["seq"] for x in checkpoints_path().read_bytes().splitlines()] == [32]


def test_long_records_are_chained_too(log: AuditLog) -> None:
    log.append("op", "t" * 9000, {}, "ok")  # a line longer than _last_line's read step
    rec = log.append("op", "x", {}, "ok")
    assert rec["seq"] == 2
    assert log.verify() == []


def test_audited_records_the_outcome_or_the_error(log: AuditLog) -> None:
    with audited(log, "instance.stop", "vm1", {"force": True}) as out:
        out.result = "stopped"
    with pytest.raises(RuntimeError), audited(log, "instance.start", "vm2", {}):
        raise RuntimeError("boom")
    with audited(log, "instance.pause", "vm3", {}):
        pass
    rs = recs()
    assert [(r["op"], r["target"], r["result"]) for r in rs] == [
        ("instance.stop", "vm1", "stopped"),
        ("instance.start", "vm2", "error: RuntimeError: boom"),
        ("instance.pause", "vm3", "ok"),
    ]
    assert log.verify() == []


# -- tampering ------------------------------------------------------------------------


def test_editing_a_record_is_reported(log: AuditLog) -> None:
    fill(log, 6)
    rs = recs()
    rs[2]["result"] = "error: nothing happened"
    write_recs(rs)
    assert "line 3 (seq 3): content does not match its hash: edited" in log.verify()


def test_editing_a_record_with_a_recomputed_hash_breaks_the_chain(log: AuditLog) -> None:
    fill(log, 6)
    rs = recs()
    rs[1]["actor"] = "nobody"
    rs[1]["hash"] = record_hash(rs[1])
    write_recs(rs)
    assert any(p.startswith("line 3 (seq 3): does not chain") for p in log.verify())


def test_editing_the_last_record_with_a_recomputed_hash(log: AuditLog) -> None:
    fill(log, 6)
    rs = recs()
    rs[-1]["target"] = "innocent"
    rs[-1]["hash"] = record_hash(rs[-1])
    write_recs(rs)
    assert "the tail was rewritten" in joined(log.verify())


def test_deleting_a_record_is_reported(log: AuditLog) -> None:
    fill(log, 6)
    ls = lines()
    write_lines(ls[:2] + ls[3:])
    problems = joined(log.verify())
    assert "line 3: sequence 4 where 3 was expected" in problems
    assert "line 3 (seq 4): does not chain" in problems


def test_deleting_the_first_record_is_reported(log: AuditLog) -> None:
    fill(log, 3)
    write_lines(lines()[1:])
    problems = joined(log.verify())
    assert "line 1: sequence 2 where 1 was expected" in problems
    assert "line 1 (seq 2): does not chain" in problems


def test_inserting_a_record_is_reported(log: AuditLog) -> None:
    fill(log, 5)
    rs = recs()
    fake = {**rs[1], "op": "trust.add", "target": "evil"}
    fake["hash"] = record_hash(fake)
    write_recs([*rs[:2], fake, *rs[2:]])
    problems = joined(log.verify())
    assert "sequence 2 where 3 was expected" in problems
    assert "does not chain" in problems


def test_reordering_records_is_reported(log: AuditLog) -> None:
    fill(log, 5)
    ls = lines()
    ls[1], ls[2] = ls[2], ls[1]
    write_lines(ls)
    problems = joined(log.verify())
    assert "line 2: sequence 3 where 2 was expected" in problems
    assert "does not chain" in problems


def test_truncating_the_tail_is_reported(log: AuditLog) -> None:
    fill(log, EVERY + 2)  # a checkpoint at EVERY, two records after it
    write_lines(lines()[:-2])
    problems = log.verify()
    assert problems == [f"the log ends at seq {EVERY} but popek wrote up to seq {EVERY + 2}: "
                        "records were cut off the end"]


def test_truncating_past_a_checkpoint_is_reported_by_both_anchors(log: AuditLog) -> None:
    fill(log, EVERY + 2)
    write_lines(lines()[:EVERY - 1])
    problems = joined(log.verify())
    assert f"checkpoint 1 signed seq {EVERY} but the log ends at seq {EVERY - 1}" in problems
    assert "records were cut off the end" in problems


def test_emptied_and_deleted_log_are_reported(log: AuditLog) -> None:
    fill(log, 3)
    write_lines([])
    assert "cut off" in joined(log.verify())
    log_path().unlink()
    assert "cut off" in joined(log.verify())


def test_rewriting_the_tail_after_a_checkpoint_is_reported(log: AuditLog) -> None:
    fill(log, EVERY + 3)
    rs = recs()
    for r in rs[EVERY:]:
        r["result"] = "ok (nothing to see)"
    write_recs(rechain(rs, EVERY))
    # the chain itself is consistent and the checkpoint still matches: only the head catches it
    problems = log.verify()
    assert problems == [f"record seq {EVERY + 3} is not the one popek wrote last: "
                        "the tail was rewritten"]


def test_rewriting_the_tail_shorter_after_a_checkpoint_is_reported(log: AuditLog) -> None:
    fill(log, EVERY + 3)
    rs = recs()
    del rs[EVERY]  # drop the first record after the checkpoint, renumber the rest
    write_recs(rechain(rs, EVERY))
    assert "records were cut off the end" in joined(log.verify())


def test_rewriting_across_a_checkpoint_is_reported(log: AuditLog) -> None:
    fill(log, EVERY + 3)
    rs = recs()
    rs[1]["target"] = "someone-else"
    forged = rechain(rs, 1)
    write_recs(forged)
    problems = joined(log.verify())
    assert f"checkpoint 1: record seq {EVERY} differs from the signed head" in problems
    assert "content does not match" not in problems and "does not chain" not in problems


def test_rewrite_even_with_the_stored_head_updated_is_caught_by_a_checkpoint(
        log: AuditLog) -> None:
    fill(log, EVERY + 1)
    rs = recs()
    rs[0]["result"] = "forged"
    forged = rechain(rs, 0)
    write_recs(forged)
    log.trust.store.put(HEAD_KEY, canonical({"seq": forged[-1]["seq"],
                                             "hash": forged[-1]["hash"]}))
    assert "checkpoint 1: record seq" in joined(log.verify())


def test_appending_by_hand_is_reported(log: AuditLog) -> None:
    fill(log, 5)
    rs = recs()
    extra = {**rs[-1], "seq": 6, "prev": rs[-1]["hash"], "op": "trust.add", "target": "evil"}
    extra["hash"] = record_hash(extra)
    write_recs([*rs, extra])
    assert log.verify() == ["records after seq 5 were not written by popek: appended by hand"]


def test_garbage_line_is_reported(log: AuditLog) -> None:
    fill(log, 4)
    ls = lines()
    write_lines([*ls[:2], b"{not json", *ls[2:]])
    assert any(p.startswith("line 3: not a valid record") for p in log.verify())
    write_lines([*ls[:2], b'{"seq": 3}', *ls[2:]])
    assert any("expected fields" in p for p in log.verify())
    write_lines([*ls[:2], b"", *ls[2:]])  # an empty line in the middle
    assert any(p.startswith("line 3: not a valid record") for p in log.verify())


def test_missing_head_with_records_is_reported(log: AuditLog) -> None:
    fill(log, 2)
    log.trust.store.delete(HEAD_KEY)
    assert log.verify() == ["the state store has no audit head although the log has records"]


def test_tampered_checkpoint_is_reported(log: AuditLog) -> None:
    fill(log, EVERY)
    cp = json.loads(checkpoints_path().read_bytes())
    assert log.verify() == []
    for bad in ({**cp, "seq": cp["seq"] - 1}, {**cp, "hash": "0" * 64},
                {**cp, "signer": "ab" * 32}):
        checkpoints_path().write_bytes(canonical(bad) + b"\n")
        assert any(p.startswith("checkpoint 1: ") for p in log.verify())
    checkpoints_path().write_bytes(b"{}\n")
    assert log.verify() == ["checkpoint 1: not a valid checkpoint record"]


def test_checkpoint_by_a_revoked_key_is_reported(log: AuditLog) -> None:
    fill(log, EVERY)
    log.trust.revoke("host-audit")
    assert any("revoked" in p for p in log.verify())


# -- any tampering, found by hypothesis ------------------------------------------------

N = 7


def _pristine(log: AuditLog) -> list[bytes]:
    """The lines of an intact N-record log, made once per test (examples restore the file)."""
    saved = audit.audit_dir() / "pristine"
    if not saved.exists():
        fill(log, N)
        saved.write_bytes(log_path().read_bytes())
    return saved.read_bytes().splitlines()


FIELDS = ["seq", "time", "actor", "op", "target", "params", "result", "prev"]
_hyp = settings(max_examples=40, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


@_hyp
@given(i=st.integers(0, N - 1), field=st.sampled_from(FIELDS),
       value=st.one_of(st.text(max_size=8), st.integers(-3, 99)), rehash=st.booleans())
def test_any_single_edit_is_reported(log: AuditLog, i: int, field: str, value: object,
                                     rehash: bool) -> None:
    good = _pristine(log)
    rs = [json.loads(x) for x in good]
    if rs[i][field] == value:
        return
    rs[i][field] = value
    if rehash:
        rs[i]["hash"] = record_hash(rs[i])
    write_recs(rs)
    assert log.verify() != []
    write_lines(good)
    assert log.verify() == []


@_hyp
@given(order=st.permutations(list(range(N))))
def test_any_reordering_is_reported(log: AuditLog, order: list[int]) -> None:
    good = _pristine(log)
    write_lines([good[i] for i in order])
    assert (log.verify() == []) == (order == sorted(order))
    write_lines(good)


@_hyp
@given(drop=st.sets(st.integers(0, N - 1), min_size=1))
def test_any_deletion_is_reported(log: AuditLog, drop: set[int]) -> None:
    good = _pristine(log)
    write_lines([x for i, x in enumerate(good) if i not in drop])
    assert log.verify() != []
    write_lines(good)


@_hyp
@given(src=st.integers(0, N - 1), at=st.integers(0, N))
def test_any_duplicated_record_is_reported(log: AuditLog, src: int, at: int) -> None:
    good = _pristine(log)
    write_lines([*good[:at], good[src], *good[at:]])
    assert log.verify() != []
    write_lines(good)


# -- known weakness --------------------------------------------------------------------


def test_truncation_stays_reported_after_the_next_append(log: AuditLog) -> None:
    fill(log, EVERY + 3)
    write_lines(lines()[:EVERY + 1])  # cut seq EVERY+2 and EVERY+3
    assert log.verify() != []
    log.append("instance.start", "vm1", {}, "ok")  # an ordinary command afterwards
    assert log.verify() != []


def test_rewritten_tail_stays_reported_after_the_next_append(log: AuditLog) -> None:
    fill(log, EVERY + 3)
    rs = recs()
    rs[EVERY]["result"] = "ok (forged)"
    write_recs(rechain(rs, EVERY))
    assert log.verify() != []
    log.append("instance.start", "vm1", {}, "ok")
    assert log.verify() != []


# -- a full disk (issue 12, point 2) ------------------------------------------------------


def test_append_whose_head_cannot_be_stored_leaves_no_record(
        log: AuditLog, monkeypatch: pytest.MonkeyPatch) -> None:
    """The record and the stored head go in together: a full store cuts the line back."""
    from popek.errors import NoSpace

    fill(log, EVERY + 1)
    before = log_path().read_bytes()
    real_put = log.trust.store.put

    def full(key: str, value: bytes, lease: int = 0) -> int:
        if key == HEAD_KEY:
            raise NoSpace("no space left on the filesystem holding state.db")
        return real_put(key, value, lease)

    monkeypatch.setattr(log.trust.store, "put", full)
    with pytest.raises(NoSpace):
        log.append("trust.allow-unsigned", "default", {"off": True}, "ok")
    assert log_path().read_bytes() == before
    monkeypatch.setattr(log.trust.store, "put", real_put)
    assert log.verify() == []  # before the fix: "records after seq 5 were not written by popek"
    log.append("trust.allow-unsigned", "default", {"off": True}, "ok")
    assert log.verify() == []


def test_append_whose_line_cannot_be_written_leaves_nothing(
        log: AuditLog, monkeypatch: pytest.MonkeyPatch) -> None:
    """A line cut short by ENOSPC is taken back, and the head is not moved."""
    import errno

    fill(log, 2)
    before = log_path().read_bytes()
    real_write = os.write
    ino = log_path().stat().st_ino

    def short_then_full(fd: int, data: Any) -> int:
        if os.fstat(fd).st_ino != ino:
            return real_write(fd, data)
        if len(data) > 20:
            return real_write(fd, bytes(data[:20]))  # half a record reaches the file
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(audit.os, "write", short_then_full)
    with pytest.raises(OSError):
        log.append("instance.launch", "web", {}, "ok")
    monkeypatch.setattr(audit.os, "write", real_write)
    assert log_path().read_bytes() == before
    assert log.verify() == []
