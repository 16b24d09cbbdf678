"""Images: the store of bootable images, their manifests and their builders.

``ImageStore`` lists, gets, deletes and builds images; an ``Image`` knows its
files and can verify them against its ``Manifest`` of ``FileEntry`` records.
"""

from popek.images.image import Image
from popek.images.manifest import FileEntry, Manifest
from popek.images.store import ImageStore

__all__ = ["FileEntry", "Image", "ImageStore", "Manifest"]
