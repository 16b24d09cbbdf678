"""Requests on trust: keys, the unsigned-image exception, the policy, audit checkpoints."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from popek.core.service import Request

if TYPE_CHECKING:
    from popek.core.service import Core
    from popek.trust.keys import TrustedKey as Key
    from popek.trust.policy import Policy


@dataclass(frozen=True)
class KeyGen(Request["Key"]):
    """Make an Ed25519 key pair; its public key is trusted for ``role`` at once."""

    op = "trust.keygen"
    shown = ("role", "days")
    name: str
    role: str
    days: int = 3650

    def run(self, core: Core) -> Key:
        """Make it."""
        return core.trust.keygen(self.name, self.role, self.days)


@dataclass(frozen=True)
class KeyAdd(Request["Key"]):
    """Trust a public key made elsewhere (``public``: its 32 raw bytes)."""

    op = "trust.add"
    shown = ("role", "days")
    name: str
    role: str
    public: bytes
    days: int = 3650

    def params(self) -> dict[str, Any]:
        """The key's bytes as hex."""
        return {**super().params(), "public": self.public.hex()}

    def run(self, core: Core) -> Key:
        """Add it."""
        return core.trust.add(self.name, self.role, self.public, self.days)


@dataclass(frozen=True)
class KeyRemove(Request["Key"]):
    """Stop trusting key ``name``."""

    op = "trust.remove"
    name: str

    def run(self, core: Core) -> Key:
        """Remove it."""
        return core.trust.remove(self.name)


@dataclass(frozen=True)
class KeyRevoke(Request["Key"]):
    """Revoke key ``name`` for good."""

    op = "trust.revoke"
    shown = ("reason",)
    name: str
    reason: str = ""

    def run(self, core: Core) -> Key:
        """Revoke it."""
        return core.trust.revoke(self.name, self.reason)


@dataclass(frozen=True)
class AllowUnsigned(Request[None]):
    """Let ``project`` launch unsigned images (``allow=False``: require signatures again)."""

    op = "trust.allow-unsigned"
    shown = ("allow",)
    project: str = "default"
    allow: bool = True

    def target(self) -> str:
        """The project."""
        return f"project {self.project}"

    def run(self, core: Core) -> None:
        """Record the project's setting."""
        from popek.trust.audit import actor
        from popek.trust.imagesig import set_allow_unsigned

        set_allow_unsigned(core.trust, self.project, self.allow, actor())


@dataclass(frozen=True)
class PolicyApply(Request["Policy"]):
    """Check, sign and install the policy ``text`` (read from ``source``)."""

    op = "policy.apply"
    shown = ("source", "key")
    text: str
    source: str = "-"
    key: str = ""

    def target(self) -> str:
        """Where the policy came from."""
        return self.source

    def run(self, core: Core) -> Policy:
        """Apply it; its version must increase."""
        from popek.trust.policy import PolicyStore

        return PolicyStore(core.trust).apply(self.text, self.key or None)


@dataclass(frozen=True)
class AuditCheckpoint(Request["dict[str, Any] | None"]):
    """Sign the current head of the audit chain now."""

    op = "audit.checkpoint"

    def run(self, core: Core) -> dict[str, Any] | None:
        """Sign it; ``None`` when the log is empty."""
        return core.audit.checkpoint()
