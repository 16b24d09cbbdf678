"""popek: a security-first virtualization platform.

Python is the control plane; QEMU, OCI runtimes and the kernel are the data plane.
"""

__version__ = "0.1.0"
