"""The tamper-evident audit log.

Every mutating operation and every console or exec session is appended to
``$POPEK_HOME/audit/log.jsonl`` as one JSON record: sequence number, time,
actor, operation, target, a SHA-256 digest of the parameters (never the
parameters themselves, which may hold secrets), the result, the hash of the
previous record and its own hash (SHA-256 of the canonical record without
that field).  The records form a chain: editing, removing, inserting or
reordering one breaks it.

Two anchors outside the file catch a rewrite of the whole tail:

* every ``CHECKPOINT_EVERY`` records (and on ``popek audit checkpoint``) the
  chain head is signed with the host's audit key into ``checkpoints.jsonl``;
* the head (sequence and hash) is also kept in the state store, so records
  cut off after the last checkpoint are noticed too.

An append names the record it is about to write in the stored head first
(``next``), then writes the line, then moves the head onto it: a process
killed between the line and the head leaves a record the store names as its
own, not a record "appended by hand" (seen when the suite killed ``popek
serve`` right after it accepted a launch).

:func:`verify` reports every problem it finds; an empty list means intact.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import pwd
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from popek import paths
from popek.errors import PopekError
from popek.state.schema import AUDIT_ALARM_KEY, AUDIT_HEAD_KEY
from popek.trust.keys import TrustError, TrustStore, canonical, iso, now

HEAD_KEY = AUDIT_HEAD_KEY
ALARM_KEY = AUDIT_ALARM_KEY  # set once when an append finds the tail tampered with
CHECKPOINT_EVERY = 32
GENESIS = "0" * 64
_FIELDS = ("seq", "time", "actor", "op", "target", "params", "result", "prev")
#: a field a record has only when it is not empty: what the request changes, in words
#: (the fields its request marks safe to show), e.g. ``allow=false`` or ``key=limits.memory``
_OPTIONAL = ("change", "identity", "project")
#: the result of the record written before a request acts (its outcome follows)
STARTED = "started"


def audit_dir() -> Path:
    """The directory of the log and its checkpoints (0700, root only)."""
    d = paths.home() / "audit"
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    return d


def log_path() -> Path:
    """The audit log file."""
    return audit_dir() / "log.jsonl"


def checkpoints_path() -> Path:
    """The signed checkpoints of the chain head."""
    return audit_dir() / "checkpoints.jsonl"


def actor() -> str:
    """Who acts: the invoking user behind sudo if any, and the effective uid."""
    uid = os.geteuid()
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = str(uid)
    sudo = os.environ.get("SUDO_USER")
    return f"{sudo} via sudo as {name}" if sudo else f"{name} (uid {uid})"


def params_digest(params: Any) -> str:
    """SHA-256 of the canonical JSON of ``params``."""
    return hashlib.sha256(canonical(params)).hexdigest()


def record_hash(rec: Mapping[str, Any]) -> str:
    """The hash of a record: SHA-256 of its canonical JSON without ``hash``."""
    return hashlib.sha256(canonical({k: rec[k] for k in (*_FIELDS, *_OPTIONAL)
                                     if k in rec})).hexdigest()


def _last_line(f: Any) -> bytes:
    f.seek(0, os.SEEK_END)
    end = f.tell()
    step = 4096
    pos = end
    buf = b""
    while pos > 0:
        pos = max(0, pos - step)
        f.seek(pos)
        buf = f.read(end - pos)
        lines = buf.rstrip(b"\n").split(b"\n")
        if len(lines) > 1 or pos == 0:
            return lines[-1]
    return b""


@contextmanager
def _all_or_nothing(f: BinaryIO) -> Iterator[None]:
    """Cut the locked, append-only file ``f`` back to its length now if the block fails.

    An append is a line in the file *and* (for the log) the head in the state
    store: when the disk is full either may fail, and a line whose head was
    never stored would make :meth:`AuditLog.verify` report the log tampered
    with for good.  Cutting frees space, so it works on a full disk too.
    """
    size = os.fstat(f.fileno()).st_size
    try:
        yield
    except BaseException:
        os.ftruncate(f.fileno(), size)
        os.fsync(f.fileno())
        raise


def _append(f: BinaryIO, data: bytes) -> None:
    """Write all of ``data`` at the end of ``f``, unbuffered (nothing is left to flush later)."""
    view = memoryview(data)
    while view:
        view = view[os.write(f.fileno(), view):]


class AuditLog:
    """Appends to and checks the audit log of this host."""

    def __init__(self, trust: TrustStore) -> None:
        self.trust = trust

    def append(self, op: str, target: str, params: Any, result: str,
               change: str = "", identity: str = "", project: str = "") -> dict[str, Any]:
        """Append one record (under an exclusive lock); return it.

        ``change`` says in words what the request changes (never a secret); it is
        left out of the record when empty, as in records written before it existed.
        ``identity`` names who asked (``root@host``, ``token NAME (ID)``) and
        ``project`` the project it acted in; each left out when empty.
        """
        path = log_path()
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "r+b") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            last = _last_line(f)
            try:
                prev_rec = json.loads(last) if last else None
                seq, prev = ((int(prev_rec["seq"]) + 1, str(prev_rec["hash"])) if prev_rec
                             else (1, GENESIS))
            except (ValueError, KeyError, TypeError):
                prev_rec, seq, prev = None, 0, "unreadable"
            self._check_head(prev_rec)
            if seq == 0:  # the last line is garbage: chain on from the stored head
                head = self._head() or {"seq": 0, "hash": GENESIS}
                head = _written(head)
                seq, prev = int(head["seq"]) + 1, str(head["hash"])
            rec: dict[str, Any] = {"seq": seq, "time": iso(now()), "actor": actor(), "op": op,
                                   "target": target, "params": params_digest(params),
                                   "result": result, "prev": prev}
            if change:
                rec["change"] = change[:500]
            if identity:
                rec["identity"] = identity[:200]
            if project:
                rec["project"] = project[:100]
            rec["hash"] = record_hash(rec)
            done = {"seq": seq, "hash": rec["hash"]}
            # first the store names the record about to be written, then the line, then
            # the head moves onto it: a kill between line and head leaves a record the
            # store knows (verify and the next append take it), never an unknown one
            self.trust.store.put(HEAD_KEY, canonical({"seq": seq - 1, "hash": prev,
                                                      "next": done}))
            with _all_or_nothing(f):  # the record and the stored head go in together
                _append(f, canonical(rec) + b"\n")
                os.fsync(f.fileno())
                self.trust.store.put(HEAD_KEY, canonical(done))
            if seq % CHECKPOINT_EVERY == 0:
                with contextlib.suppress(OSError, PopekError):  # the next one signs it
                    self._checkpoint(seq, rec["hash"])
        return rec

    def _head(self) -> dict[str, Any] | None:
        kv = self.trust.store.get(HEAD_KEY)
        return dict(json.loads(kv.value)) if kv else None

    def _check_head(self, last: dict[str, Any] | None) -> None:
        """Before chaining on: the last record must be the one popek wrote last.

        Otherwise the tail was cut or rewritten; appending would move the
        stored head onto the forgery and hide it, so the finding is kept in
        the store for :meth:`verify` to report for good.
        """
        head = self._head()
        if head is None or self.trust.store.get(ALARM_KEY) is not None:
            return
        if not _is(last, head) and not _is(last, head.get("next")):
            found = (f"seq {last.get('seq')}" if last else "no record")
            self.trust.store.put(ALARM_KEY, canonical({
                "time": iso(now()), "expected_seq": head["seq"], "found": found}))

    def checkpoint(self) -> dict[str, Any] | None:
        """Sign the current head now; ``None`` when the log is empty."""
        path = log_path()
        if not path.exists():
            return None
        with open(path, "rb") as f:
            fcntl.flock(f, fcntl.LOCK_SH)
            last = _last_line(f)
        if not last:
            return None
        rec = json.loads(last)
        return self._checkpoint(int(rec["seq"]), str(rec["hash"]))

    def _checkpoint(self, seq: int, head: str) -> dict[str, Any]:
        body = {"seq": seq, "hash": head, "time": iso(now())}
        kid, sig = self.trust.sign(self.trust.host_key("audit"), "audit", canonical(body))
        cp = {**body, "signer": kid, "signature": sig}
        fd = os.open(checkpoints_path(), os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC,
                     0o600)
        with os.fdopen(fd, "r+b") as f, _all_or_nothing(f):
            _append(f, canonical(cp) + b"\n")
        return cp

    def records(self) -> Iterator[dict[str, Any]]:
        """Every parseable record, in file order."""
        path = log_path()
        if not path.exists():
            return
        with open(path, "rb") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if isinstance(rec, dict):
                    yield rec

    def verify(self) -> list[str]:
        """Check the whole chain, the signed checkpoints and the stored head.

        Returns one message per problem (empty when the log is intact).
        """
        problems: list[str] = []
        hashes: dict[int, str] = {}
        expect_seq, prev = 1, GENESIS
        path = log_path()
        lines = path.read_bytes().split(b"\n") if path.exists() else []
        if lines and lines[-1] == b"":
            lines.pop()
        for n, line in enumerate(lines, 1):
            try:
                rec = json.loads(line)
                if not isinstance(rec, dict) or not {*_FIELDS, "hash"} <= set(rec) <= {
                        *_FIELDS, *_OPTIONAL, "hash"}:
                    raise ValueError("not a record with the expected fields")
            except ValueError as exc:
                problems.append(f"line {n}: not a valid record ({exc}): edited")
                expect_seq += 1
                prev = ""
                continue
            seq = rec["seq"]
            if rec["hash"] != record_hash(rec):
                problems.append(f"line {n} (seq {seq}): content does not match its hash: edited")
            if seq != expect_seq:
                problems.append(f"line {n}: sequence {seq} where {expect_seq} was expected: "
                                "a record was removed, inserted or reordered")
            if prev and rec["prev"] != prev:
                problems.append(f"line {n} (seq {seq}): does not chain to the record before "
                                "it: a record was removed, inserted, reordered or edited")
            hashes[seq] = rec["hash"]
            expect_seq, prev = (seq if isinstance(seq, int) else expect_seq) + 1, rec["hash"]
        last_seq = expect_seq - 1
        problems += self._verify_checkpoints(hashes, last_seq)
        alarm = self.trust.store.get(ALARM_KEY)
        if alarm is not None:
            a = json.loads(alarm.value)
            problems.append(f"on {a['time']} popek found the log's end at {a['found']} where it "
                            f"had written seq {a['expected_seq']}: the tail was cut or rewritten "
                            "before later records were appended")
        kv = self.trust.store.get(HEAD_KEY)
        if kv is not None:
            head = json.loads(kv.value)
            if _is(_last_record(lines), head.get("next")):
                head = head["next"]  # its append was interrupted after the line went in
            hashes.setdefault(0, GENESIS)  # a head before the first record: nothing written
            if head["seq"] > last_seq:
                problems.append(f"the log ends at seq {last_seq} but popek wrote up to seq "
                                f"{head['seq']}: records were cut off the end")
            elif hashes.get(head["seq"]) != head["hash"]:
                problems.append(f"record seq {head['seq']} is not the one popek wrote last: "
                                "the tail was rewritten")
            elif head["seq"] < last_seq:
                problems.append(f"records after seq {head['seq']} were not written by popek: "
                                "appended by hand")
        elif last_seq:
            problems.append("the state store has no audit head although the log has records")
        return problems

    def _verify_checkpoints(self, hashes: dict[int, str], last_seq: int) -> list[str]:
        problems: list[str] = []
        path = checkpoints_path()
        if not path.exists():
            return problems
        for n, line in enumerate(path.read_bytes().splitlines(), 1):
            try:
                cp = json.loads(line)
                body = {"seq": cp["seq"], "hash": cp["hash"], "time": cp["time"]}
                self.trust.verify(cp["signer"], "audit", canonical(body), cp["signature"])
            except (ValueError, KeyError, TypeError):
                problems.append(f"checkpoint {n}: not a valid checkpoint record")
                continue
            except TrustError as exc:
                problems.append(f"checkpoint {n}: {exc}")
                continue
            if cp["seq"] > last_seq:
                problems.append(f"checkpoint {n} signed seq {cp['seq']} but the log ends at "
                                f"seq {last_seq}: records were cut off")
            elif hashes.get(cp["seq"]) != cp["hash"]:
                problems.append(f"checkpoint {n}: record seq {cp['seq']} differs from the "
                                "signed head: the log was rewritten")
        return problems


def _is(rec: Any, mark: Any) -> bool:
    """Whether ``rec`` (a record, ``None``: no record) is the one a stored head ``mark``
    names; a head of seq 0 names the empty log."""
    if not isinstance(mark, dict):
        return False
    if rec is None:
        return bool(mark.get("seq") == 0)
    return bool(isinstance(rec, dict) and rec.get("seq") == mark.get("seq")
                and rec.get("hash") == mark.get("hash"))


def _written(head: dict[str, Any]) -> dict[str, Any]:
    """The head without its pending record (the one an interrupted append named)."""
    return {"seq": head["seq"], "hash": head["hash"]}


def _last_record(lines: list[bytes]) -> dict[str, Any] | None:
    """The last line as a record, ``None`` when there is none or it is not one."""
    if not lines:
        return None
    try:
        rec = json.loads(lines[-1])
    except ValueError:
        return None
    return rec if isinstance(rec, dict) else None


@dataclass
class Outcome:
    """Filled in by the caller of :func:`audited` with a result more precise than ok."""

    result: str = "ok"


@contextmanager
def audited(log: AuditLog, op: str, target: str, params: Any) -> Iterator[Outcome]:
    """Record ``op`` on ``target`` when the block ends: its outcome, or the error it raised."""
    out = Outcome()
    try:
        yield out
    except BaseException as exc:
        log.append(op, target, params, f"error: {type(exc).__name__}: {exc}"[:500])
        raise
    log.append(op, target, params, out.result)
