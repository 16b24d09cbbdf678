"""An append killed midway (SIGKILL, a real process) leaves an intact log (no root).

An append writes its line and moves the stored head onto it.  A process
killed between the two used to leave a record the store did not know:
``audit verify`` said "appended by hand" and the next append raised the
tampering alarm for good (seen in the suite, where ``popek serve`` was killed
right after it accepted a launch).  The store now names the record before
the line is written, so only that exact record is taken as popek's own.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from popek.trust.audit import GENESIS, HEAD_KEY, AuditLog, log_path, record_hash
from popek.trust.keys import TrustStore, canonical

#: a process that appends one record and is killed at ``sys.argv[2]``: ``head`` (the line
#: is written, the head not yet moved onto it) or ``line`` (before the line is written)
_KILLED_APPEND = textwrap.dedent("""
    import json, os, signal, sys
    from pathlib import Path
    from popek.state.store import SQLiteStore
    from popek.trust import audit
    from popek.trust.keys import TrustStore

    store = SQLiteStore(Path(sys.argv[1]))
    log = audit.AuditLog(TrustStore(store))
    if sys.argv[2] == "head":
        real = store.put

        def put(key, value, lease=0):
            if key == audit.HEAD_KEY and "next" not in json.loads(value):
                os.kill(os.getpid(), signal.SIGKILL)
            return real(key, value, lease)

        store.put = put
    else:
        def append(f, data):
            os.kill(os.getpid(), signal.SIGKILL)

        audit._append = append
    log.append("instance.launch", "lost", {"image": "minimal"}, "started")
""")


def killed_append(trust: TrustStore, where: str) -> None:
    """Run one append in another process, killed with SIGKILL at ``where``."""
    db = Path(trust.store.path)  # type: ignore[attr-defined]  # the SQLite store of the fixture
    proc = subprocess.run([sys.executable, "-c", _KILLED_APPEND, str(db), where],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr


def lines() -> list[bytes]:
    path = log_path()
    return path.read_bytes().splitlines() if path.exists() else []


def fill(log: AuditLog, n: int) -> None:
    for i in range(n):
        log.append("op", f"target-{i}", {"i": i}, "ok")


@pytest.mark.parametrize("before", [0, 3])
def test_a_kill_between_the_line_and_the_head_leaves_an_intact_log(
        trust: TrustStore, before: int) -> None:
    log = AuditLog(trust)
    fill(log, before)
    killed_append(trust, "head")
    written = [json.loads(x) for x in lines()]
    assert len(written) == before + 1 and written[-1]["target"] == "lost"  # the line went in
    assert json.loads(trust.store.get(HEAD_KEY).value)["seq"] == before  # type: ignore[union-attr]
    assert log.verify() == []  # before the fix: "records after seq N ... appended by hand"
    rec = log.append("instance.delete", "lost", {}, "ok")
    assert rec["seq"] == before + 2 and rec["prev"] == written[-1]["hash"]
    assert log.verify() == []  # before the fix: "found the log's end at seq N+1 ..."


def test_a_kill_before_the_line_leaves_the_log_as_it_was(trust: TrustStore) -> None:
    log = AuditLog(trust)
    fill(log, 2)
    before = lines()
    killed_append(trust, "line")
    assert lines() == before
    assert log.verify() == []
    assert log.append("op", "after", {}, "ok")["seq"] == 3
    assert log.verify() == []


def test_only_the_record_the_store_named_is_taken_after_a_kill(trust: TrustStore) -> None:
    """A forger who appends a chained record of their own after a kill is still caught."""
    log = AuditLog(trust)
    fill(log, 2)
    killed_append(trust, "line")  # the store names seq 3; its line was never written
    last = json.loads(lines()[-1])
    forged = {"seq": 3, "time": last["time"], "actor": last["actor"], "op": "instance.launch",
              "target": "lost", "params": last["params"], "result": "ok", "prev": last["hash"]}
    forged["hash"] = record_hash(forged)
    with log_path().open("ab") as f:
        f.write(canonical(forged) + b"\n")
    assert any("appended by hand" in p for p in log.verify()), log.verify()
    log.append("op", "after", {}, "ok")
    assert any("found the log's end at seq 3" in p for p in log.verify()), log.verify()


def test_a_head_before_the_first_record_is_an_empty_log(trust: TrustStore) -> None:
    log = AuditLog(trust)
    killed_append(trust, "line")
    assert json.loads(trust.store.get(HEAD_KEY).value)["hash"] == GENESIS  # type: ignore[union-attr]
    assert log.verify() == []
    assert log.append("op", "first", {}, "ok")["seq"] == 1
    assert log.verify() == []
