"""The container engine: system containers on an OCI runtime (runc or crun)."""

from popek.engines.container.engine import ContainerEngine

__all__ = ["ContainerEngine"]
