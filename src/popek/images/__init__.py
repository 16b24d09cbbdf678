"""Images: the store of VM and container images, their manifests and their builders.

``ImageStore`` lists, gets, deletes, builds ("minimal", "debian") and imports
(rootfs tarballs, OCI layouts) images; an ``Image`` knows its files and what
it can run as (``kinds()``), verifies them against its ``Manifest`` of
``FileEntry`` records, and extracts its root filesystem for a container
(``extract_rootfs``).  ``Process`` is an image's default container process.
"""

from popek.images.image import Image
from popek.images.manifest import FileEntry, Manifest
from popek.images.process import Process
from popek.images.store import ImageStore

__all__ = ["FileEntry", "Image", "ImageStore", "Manifest", "Process"]
