"""Kernel modules for an initramfs: dependency closure with kmod, copy, depmod.

``depmod``/``modprobe --show-depends`` from kmod resolve the dependencies
against the extracted kernel package, so no load order is kept by hand.
Compressed modules are decompressed because busybox ``modprobe`` in the
guest loads plain ``.ko`` files.
"""

from __future__ import annotations

import gzip
import lzma
import shutil
import subprocess
from pathlib import Path

from popek import proc
from popek.errors import ImageError

_SUFFIXES = (".ko.xz", ".ko.zst", ".ko.gz", ".ko")
EXTRA_FILES = ("modules.builtin", "modules.order", "modules.builtin.modinfo")


def module_dir(root: Path, kver: str) -> Path:
    """Return ``lib/modules/KVER`` (or ``usr/lib/modules/KVER``) under ``root``."""
    for rel in ("lib/modules", "usr/lib/modules"):
        candidate = root / rel / kver
        if candidate.is_dir():
            return candidate
    raise ImageError(f"kernel package has no modules directory for {kver}")


def _modname(filename: str) -> str:
    for suffix in _SUFFIXES:
        if filename.endswith(suffix):
            filename = filename[: -len(suffix)]
            break
    return filename.replace("-", "_")


def builtin_modules(root: Path, kver: str) -> set[str]:
    """Return the names of modules built into the kernel (``modules.builtin``)."""
    path = module_dir(root, kver) / "modules.builtin"
    if not path.exists():
        return set()
    return {_modname(Path(line.strip()).name) for line in path.read_text().splitlines() if line}


def depmod(root: Path, kver: str) -> None:
    """Run ``depmod -b ROOT KVER``."""
    res = subprocess.run(["depmod", "-b", str(root), kver], capture_output=True, text=True)
    if res.returncode != 0:
        raise ImageError(f"depmod failed for {root}: {res.stderr.strip()}")


def closure(root: Path, kver: str, wanted: list[str], optional: frozenset[str]) -> list[Path]:
    """Return the module files (absolute, under ``root``) ``wanted`` needs, in load order.

    Built-in modules are skipped; a module missing from the kernel is an
    error unless its name is in ``optional``.  ``depmod`` must have run.
    """
    builtin = builtin_modules(root, kver)
    files: list[Path] = []
    for name in wanted:
        if name.replace("-", "_") in builtin:
            continue
        res = subprocess.run(
            ["modprobe", "-d", str(root), "-S", kver, "--show-depends", name],
            capture_output=True,
            text=True,
        )
        if res.returncode != 0:
            if name in optional:
                continue
            raise ImageError(f"kernel {kver} has no module '{name}': {res.stderr.strip()}")
        for line in res.stdout.splitlines():
            words = line.split()
            if len(words) >= 2 and words[0] == "insmod":
                path = Path(words[1])
                if path not in files:
                    files.append(path)
    return files


def _decompress(src: Path, dest: Path) -> None:
    name = src.name
    if name.endswith(".ko.xz"):
        with lzma.open(src) as fin, dest.open("wb") as fout:
            shutil.copyfileobj(fin, fout)
    elif name.endswith(".ko.gz"):
        with gzip.open(src) as fin, dest.open("wb") as fout:
            shutil.copyfileobj(fin, fout)
    elif name.endswith(".ko.zst"):
        if proc.tool("zstd") is None:
            raise ImageError(f"module {name} is zstd-compressed; install the zstd package")
        with dest.open("wb") as fout:
            subprocess.run(["zstd", "-dc", str(src)], stdout=fout, check=True)
    else:
        shutil.copyfile(src, dest)


def install(src_root: Path, modules: list[Path], dest_root: Path, kver: str) -> list[str]:
    """Copy ``modules`` into ``dest_root/lib/modules/KVER`` (same relative paths), run depmod.

    Returns the installed paths relative to the modules directory.
    """
    src_dir = module_dir(src_root, kver)
    dest_dir = dest_root / "lib" / "modules" / kver
    dest_dir.mkdir(parents=True, exist_ok=True)
    installed: list[str] = []
    for mod in modules:
        rel = mod.relative_to(src_dir)
        base = rel.name
        for suffix in (".xz", ".zst", ".gz"):
            base = base.removesuffix(suffix)
        target = dest_dir / rel.parent / base
        target.parent.mkdir(parents=True, exist_ok=True)
        _decompress(mod, target)
        target.chmod(0o644)
        installed.append(str(target.relative_to(dest_dir)))
    for extra in EXTRA_FILES:
        if (src_dir / extra).exists():
            shutil.copyfile(src_dir / extra, dest_dir / extra)
    depmod(dest_root, kver)
    return installed
