"""The trust checks core makes before it acts: image signatures and access control.

One :class:`Guard` per :class:`popek.core.instances.Instances`.  It opens the
trust store, the policy and the audit log lazily, so commands that check
nothing (list, info) do not load the cryptography library.  Every access
control decision is written to the audit log, allowed or not.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from popek.images import Image
    from popek.state.store import StateStore
    from popek.trust.audit import AuditLog
    from popek.trust.imagesig import Verdict
    from popek.trust.keys import TrustStore
    from popek.trust.measure import Measurement
    from popek.trust.policy import Decision


class Guard:
    """Image signature checks and access control decisions, each one audited."""

    def __init__(self, store: StateStore) -> None:
        self.store = store

    @cached_property
    def trust(self) -> TrustStore:
        """The trust store (keys) over the state store."""
        from popek.trust.keys import TrustStore

        return TrustStore(self.store)

    @cached_property
    def audit(self) -> AuditLog:
        """The audit log of this host."""
        from popek.trust.audit import AuditLog

        return AuditLog(self.trust)

    def image(self, image: Image, asked: str, project: str) -> Verdict:
        """Check the signature of ``image`` launched as ``asked`` (see trust.imagesig)."""
        from popek.trust.imagesig import check_image

        return check_image(self.trust, image, asked, project)

    def check(self, label: str, action: str, obj: str, running: Iterable[str] = (),
              sharers: Iterable[str] = ()) -> Decision:
        """Decide with the policy in force, audit the decision, raise when it denies.

        Raises :class:`popek.trust.policy.PolicyDenied`.
        """
        from popek.trust.policy import PolicyDenied, check_signed, decide

        try:
            policy = check_signed(self.trust)
        except PolicyDenied as exc:
            self.audit.append("policy.check", f"{label} {action} {obj}", {}, f"deny: {exc}")
            raise
        d = decide(policy, label, action, obj, running, sharers)
        self.audit.append("policy.check", f"{label} {action} {obj}",
                          {"version": policy.version, "mode": policy.mode},
                          f"{d.verdict}: {d.reason}")
        if not d.allowed:
            raise PolicyDenied(f"access control policy (version {policy.version}) denies: "
                               f"{d.reason}")
        return d

    def measurer(self, workdir: Path, verdict: Verdict
                 ) -> tuple[Callable[[str, bytes], str], list[Measurement]]:
        """A callback for ``LaunchSpec.measure`` and the list it appends the measurement to."""
        from popek.trust import measure as ms
        from popek.trust.policy import check_signed

        box: list[Measurement] = []

        def cb(binary: str, config: bytes) -> str:
            pol = check_signed(self.trust)
            m = ms.measure(self.trust, binary, config, verdict.statement_sha256, pol.text,
                           pol.version)
            ms.write(workdir, m)
            box.append(m)
            return m.value

        return cb, box
