"""The QEMU engine (KVM where a real KVM answers, TCG otherwise)."""

from popek.engines.qemu.engine import QemuEngine

__all__ = ["QemuEngine"]
