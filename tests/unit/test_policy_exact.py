"""The signed policy store's exact answers (popek.trust.policy).

Written against the survivors of ``make mutants`` (bench/mutants.py): an
older, validly signed policy put back is refused; a signed text that does not
parse is reported with the parser's reason; ``info`` for each kind of record;
the messages of the refusals in full.
"""

from __future__ import annotations

import json

import pytest

from popek.errors import InvalidInput
from popek.trust.keys import TrustError, TrustStore, canonical
from popek.trust.policy import POLICY_KEY, PolicyDenied, PolicyStore, check_signed, parse


def policy_text(version: int) -> str:
    return f'version = {version}\nmode = "enforcing"\nlabels = ["default", "a", "b"]\n'


def test_an_older_signed_policy_put_back_is_refused(trust: TrustStore) -> None:
    ps = PolicyStore(trust)
    ps.apply(policy_text(1))
    old = trust.store.get(POLICY_KEY)
    assert old is not None
    ps.apply(policy_text(2))
    trust.store.put(POLICY_KEY, old.value)  # validly signed, but not the last one applied
    with pytest.raises(TrustError) as exc:
        ps.current()
    msg = ("the stored policy has version 1 but version 2 was applied last: an older policy "
           "was put back")
    assert str(exc.value) == msg
    with pytest.raises(PolicyDenied) as denied:
        check_signed(trust)
    assert str(denied.value) == (f"the stored access control policy failed its check ({msg}); "
                                 "every operation it governs is refused until a valid policy "
                                 "is applied")


def test_a_signed_text_that_does_not_parse_is_reported(trust: TrustStore) -> None:
    ps = PolicyStore(trust)
    ps.apply(policy_text(1))
    body = {"version": 1, "text": "version = -1\n", "applied": "2026-01-01T00:00:00Z"}
    kid, sig = trust.sign("host-policy", "policy", canonical(body))
    trust.store.put(POLICY_KEY, canonical({**body, "signer": kid, "signature": sig}))
    with pytest.raises(TrustError) as exc:
        ps.current()
    assert str(exc.value) == ("the stored policy does not parse: policy: 'version' must be a "
                              "non-negative integer")


def test_version_message_exactly() -> None:
    with pytest.raises(InvalidInput) as exc:
        parse('version = -1\nlabels = ["a"]\n')
    assert str(exc.value) == "policy: 'version' must be a non-negative integer"


def test_info_of_each_kind_of_record(trust: TrustStore) -> None:
    ps = PolicyStore(trust)
    assert ps.info() == {"version": 0, "applied": "", "signer": "", "source": "built-in default"}
    ps.apply(policy_text(4))
    kv = trust.store.get(POLICY_KEY)
    assert kv is not None
    doc = json.loads(kv.value)
    assert ps.info() == {"version": 4, "applied": doc["applied"], "signer": "host-policy",
                         "source": "applied"}
    trust.remove("host-policy")  # the signer is no longer known: its id, shortened
    assert ps.info() == {"version": 4, "applied": doc["applied"], "signer": doc["signer"][:16],
                         "source": "applied"}
    trust.store.put(POLICY_KEY, canonical({**doc, "signer": 1234567}))
    assert ps.info()["signer"] == "1234567"
    trust.store.put(POLICY_KEY, b"garbage")
    assert ps.info() == {"version": "?", "applied": "", "signer": "", "source": "malformed record"}
