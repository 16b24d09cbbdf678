"""The ``ceph`` driver: the volumes of a pool as RBD images in a pool of a Ceph cluster.

popek manages an existing cluster, it never runs one: a pool names the
cluster's configuration file (``conf``), a client (``client``, e.g. ``admin``
for client.admin), that client's keyring (``keyring``) and the RBD pool
(``pool``).  Management goes through librados/librbd's Python bindings
(Debian's ``python3-rados``/``python3-rbd``); the blocks themselves never pass
through Python: QEMU opens the images with its ``rbd`` driver, and import and
export are ``qemu-img convert`` to or from ``rbd:``.

A volume is the image ``PREFIX.PROJECT.NAME`` (names are ``[a-z0-9-]``, so the
dots cannot be ambiguous); ``PREFIX`` is ``popek-`` and 8 random hex digits
drawn when the pool is made, so two popek pools on one Ceph pool (or images
that are not popek's) never see each other's images, and reconcile removes
only its own.  A snapshot is an RBD snapshot; a clone is a copy-on-write RBD
clone of a protected snapshot (constant time whatever the size); a restore is
a rollback.  Every call has a deadline: the connection and each monitor and
OSD operation time out after :data:`TIMEOUT_S` seconds (``client_mount_timeout``,
``rados_mon_op_timeout``, ``rados_osd_op_timeout``), so an unreachable cluster
is a clear :class:`EngineError` within seconds, never a hang.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import secrets
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from popek.errors import EngineError, InvalidInput
from popek.storage.dirpool import made, run_convert

#: the settings of a ceph pool: the first three are required, ``client`` is ``admin``
#: when left out
KEYS = ("conf", "keyring", "pool", "client")
REQUIRED = ("conf", "keyring", "pool")
DEFAULT_CLIENT = "admin"
#: seconds the connection and each monitor or OSD operation may take
TIMEOUT_S = 5
#: the features of a new image: layering (clones), exclusive-lock, object-map and
#: fast-diff (``used`` without reading every object), deep-flatten
FEATURES = 1 | 4 | 8 | 16 | 32
#: the image metadata key holding the bytes an encrypted image's LUKS header takes
#: before its data (the image is that much larger than the volume the guest sees)
LUKS_OFFSET = "popek.luks-offset"


def new_prefix() -> str:
    """A fresh image prefix for a new pool (``popek-`` and 8 hex digits)."""
    return f"popek-{secrets.token_hex(4)}"


def check_config(config: dict[str, str]) -> dict[str, str]:
    """The settings of a new ceph pool, completed (``client``); :class:`InvalidInput` on
    one missing or wrong (paths must be absolute, readable files; names plain)."""
    missing = [k for k in REQUIRED if not config.get(k)]
    if missing:
        raise InvalidInput(f"a ceph pool needs {', '.join(f'{k}=' for k in missing)}: "
                           "conf=CEPH.CONF keyring=KEYRING pool=RBD_POOL [client=NAME]")
    out = {"client": DEFAULT_CLIENT, **config}
    for key in ("conf", "keyring"):
        path = Path(out[key])
        if not path.is_absolute() or any(c in out[key] for c in ":@\n"):
            raise InvalidInput(f"invalid {key} {out[key]!r}: give an absolute path without "
                               "':' or '@'")
        if not path.is_file() or not os.access(path, os.R_OK):
            raise InvalidInput(f"{key} file {path} does not exist or is not readable")
    client = out["client"].removeprefix("client.")
    for key, value in (("client", client), ("pool", out["pool"])):
        if not value or any(c in value for c in ":@/ \n\t"):
            raise InvalidInput(f"invalid ceph {key} name {value!r}: no ':', '@', '/' or space")
    out["client"] = client
    return out


def read_key(keyring: Path, client: str) -> str:
    """The secret of ``client.CLIENT`` in the keyring file (base64, as Ceph writes it);
    :class:`EngineError` when the file has none."""
    try:
        text = keyring.read_text()
    except OSError as exc:
        raise EngineError(f"cannot read keyring {keyring}: {exc.strerror or exc}") from exc
    return parse_key(text, client, str(keyring))


def parse_key(text: str, client: str, where: str = "the keyring") -> str:
    """The ``key`` of section ``[client.CLIENT]`` of a Ceph keyring's text."""
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1].strip()
        elif section == f"client.{client}" and "=" in line:
            name, _, value = line.partition("=")
            if name.strip() == "key" and value.strip():
                return value.strip()
    raise EngineError(f"{where} holds no key for client.{client}")


def mon_servers(mon_host: str) -> list[tuple[str, str]]:
    """The monitors of a ``mon_host`` setting as (host, port) for QEMU's ``server`` list.

    ``[v2:IP:3300,v1:IP:6789]`` address vectors give their v2 address (else their v1);
    a plain ``HOST`` or ``HOST:PORT`` gives itself (6789, v1's port, when none is
    given); entries are separated by commas, semicolons or spaces outside brackets.
    """
    entries: list[str] = []
    depth, word = 0, ""
    for ch in mon_host:
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if depth == 0 and ch in ",; \t":
            entries.append(word)
            word = ""
        else:
            word += ch
    entries.append(word)
    out: list[tuple[str, str]] = []
    for entry in (e.strip() for e in entries if e.strip()):
        if entry.startswith("[") and entry.endswith("]") and ("v1:" in entry
                                                              or "v2:" in entry):
            addrs = dict(a.split(":", 1) for a in entry[1:-1].split(",") if ":" in a)
            entry = addrs.get("v2") or addrs.get("v1") or ""
            entry = entry.split("/", 1)[0]  # a nonce after the port
        else:
            entry = entry.removeprefix("v2:").removeprefix("v1:")
        host, sep, port = entry.rpartition(":")
        if not sep or not port.isdigit() or (":" in host and not host.startswith("[")):
            host, port = entry, "6789"  # no port (an IPv6 address alone has colons too)
        host = host.strip("[]")
        if host:
            out.append((host, port))
    if not out:
        raise EngineError(f"no monitor address in mon_host {mon_host!r}")
    return out


def resolved(servers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """``servers`` with host names resolved to addresses here (a jailed QEMU has no
    ``/etc`` to resolve them with)."""
    out = []
    for host, port in servers:
        try:
            ipaddress.ip_address(host)
            out.append((host, port))
        except ValueError:
            try:
                out.append((str(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][4][0]),
                            port))
            except OSError as exc:
                raise EngineError(f"cannot resolve Ceph monitor {host}: {exc}") from exc
    return out


def image_name(prefix: str, project: str, name: str) -> str:
    """The RBD image of volume ``name`` of ``project``."""
    return f"{prefix}.{project}.{name}"


def rbd_spec(pool: str, image: str, client: str, conf: str, keyring: str) -> str:
    """QEMU's ``rbd:`` file name of ``image`` (for qemu-img, run by popek on the host)."""
    return f"rbd:{pool}/{image}:id={client}:conf={conf}:keyring={keyring}"


def _bindings() -> tuple[Any, Any]:
    try:
        import rados
        import rbd
    except ImportError as exc:
        raise EngineError("the ceph driver needs librados/librbd's Python bindings (Debian's "
                          f"python3-rados and python3-rbd; make setup links them): {exc}") \
            from exc
    return rados, rbd


class CephPool:
    """The RBD images of one ``ceph`` pool (``config``: conf, keyring, pool, client,
    prefix)."""

    def __init__(self, name: str, config: dict[str, str]) -> None:
        self.name = name
        self.config = config
        self.prefix = config.get("prefix", "")
        self._cluster: Any = None

    # -- connection ------------------------------------------------------------------
    def _where(self) -> str:
        return f"the Ceph cluster of pool {self.name} ({self.config.get('conf')})"

    def _connect(self) -> Any:
        if self._cluster is not None:
            return self._cluster
        rados, _ = _bindings()
        t = str(TIMEOUT_S)
        try:
            cluster = rados.Rados(conffile=self.config["conf"],
                                  rados_id=self.config.get("client", DEFAULT_CLIENT),
                                  conf={"keyring": self.config["keyring"],
                                        "client_mount_timeout": t, "rados_mon_op_timeout": t,
                                        "rados_osd_op_timeout": t})
            cluster.connect(timeout=TIMEOUT_S)
        except rados.TimedOut as exc:
            raise EngineError(f"{self._where()} did not answer within {TIMEOUT_S} s: is it "
                              "running and reachable from this host?") from exc
        except rados.PermissionError as exc:
            raise EngineError(f"{self._where()} refused client."
                              f"{self.config.get('client')}: check keyring "
                              f"{self.config['keyring']} ({exc})") from exc
        except rados.Error as exc:
            raise EngineError(f"cannot connect to {self._where()}: {exc}") from exc
        self._cluster = cluster
        return cluster

    def close(self) -> None:
        """Drop the connection (made again on the next call)."""
        if self._cluster is not None:
            self._cluster.shutdown()
            self._cluster = None

    def __del__(self) -> None:
        # a driver dropped without close(): librados's threads go with it, not later
        with contextlib.suppress(Exception):
            self.close()

    @contextmanager
    def _io(self) -> Iterator[Any]:
        rados, rbd = _bindings()
        cluster = self._connect()
        try:
            ioctx = cluster.open_ioctx(self.config["pool"])
        except rados.ObjectNotFound as exc:
            try:
                pools = ", ".join(cluster.list_pools()) or "none"
            except rados.Error:
                pools = "unknown"
            raise InvalidInput(f"Ceph pool {self.config['pool']!r} does not exist in "
                               f"{self._where()}; pools there: {pools}") from exc
        except rados.Error as exc:
            raise EngineError(f"cannot open Ceph pool {self.config['pool']!r}: {exc}") from exc
        try:
            yield ioctx
        except (rados.TimedOut, rbd.Timeout) as exc:
            raise EngineError(f"{self._where()} did not answer within {TIMEOUT_S} s") from exc
        except (rados.Error, rbd.Error) as exc:
            raise EngineError(f"Ceph pool {self.config['pool']}: {exc}") from exc
        finally:
            ioctx.close()

    @contextmanager
    def _image(self, project: str, name: str, snap: str | None = None,
               read_only: bool = False) -> Iterator[Any]:
        _, rbd = _bindings()
        with self._io() as ioctx:
            try:
                image = rbd.Image(ioctx, image_name(self.prefix, project, name), snapshot=snap,
                                  read_only=read_only)
            except rbd.ImageNotFound as exc:
                raise EngineError(f"the RBD image of volume {project}/{name} is missing from "
                                  f"Ceph pool {self.config['pool']}") from exc
            try:
                yield image
            finally:
                image.close()

    def image(self, project: str, name: str) -> str:
        """The RBD image name of volume ``name`` of ``project``."""
        return image_name(self.prefix, project, name)

    # -- the pool --------------------------------------------------------------------
    def check(self) -> None:
        """Raise :class:`InvalidInput` unless the cluster answers and the RBD pool is
        there (an unreachable cluster says so within seconds)."""
        try:
            with self._io() as ioctx:
                ioctx.get_stats()
        except EngineError as exc:
            raise InvalidInput(str(exc)) from exc

    def capacity(self) -> tuple[int, int]:
        """The pool's size (what it stores plus what it can still take) and its free bytes,
        as the cluster's ``df`` says (replication counted)."""
        cluster = self._connect()
        ret, out, err = cluster.mon_command(json.dumps({"prefix": "df", "format": "json"}),
                                            b"", timeout=TIMEOUT_S)
        if ret != 0:
            raise EngineError(f"{self._where()}: df failed: {err}")
        for p in json.loads(out)["pools"]:
            if p["name"] == self.config["pool"]:
                stats = p["stats"]
                return int(stats["stored"]) + int(stats["max_avail"]), int(stats["max_avail"])
        raise EngineError(f"Ceph pool {self.config['pool']} is not in the cluster's df")

    def health(self) -> str:
        """The cluster's health: ``HEALTH_OK``, or the status and its checks' summaries."""
        cluster = self._connect()
        ret, out, err = cluster.mon_command(json.dumps({"prefix": "health", "format": "json"}),
                                            b"", timeout=TIMEOUT_S)
        if ret != 0:
            return f"unknown (the cluster refused 'health': {err})"
        doc = json.loads(out)
        checks = [str(c.get("summary", {}).get("message", name))
                  for name, c in sorted((doc.get("checks") or {}).items())]
        return str(doc["status"]) + (f": {'; '.join(checks)}" if checks else "")

    def mon_host(self) -> str:
        """The monitors' addresses as the configuration gives them (``mon_host``)."""
        return str(self._connect().conf_get("mon_host"))

    # -- volumes ---------------------------------------------------------------------
    def create(self, project: str, name: str, kind: str, size: int,
               key: str | None = None) -> None:
        """Make the image (thin) of block volume ``name``; with ``key``, a LUKS container
        (QEMU's LUKS over the raw image, AES-256-XTS, passphrase ``key``), the image larger
        than ``size`` by the header (see docs/ARCHITECTURE.md for why not librbd's)."""
        _, rbd = _bindings()
        if kind != "block":
            raise InvalidInput(f"a ceph pool holds block volumes, not {kind} volumes")
        if key:
            self._encrypt(project, name, size, key)
            return
        with self._io() as ioctx:
            try:
                rbd.RBD().create(ioctx, self.image(project, name), size, old_format=False,
                                 features=FEATURES)
            except rbd.ImageExists as exc:
                raise EngineError(f"RBD image {self.image(project, name)} exists already in "
                                  f"Ceph pool {self.config['pool']}") from exc

    def _encrypt(self, project: str, name: str, size: int, key: str) -> None:
        """Make the image as a LUKS container of ``size`` bytes (QEMU's own LUKS, written
        by ``qemu-img create -f luks``, the key through a pipe); the header's size kept as
        :data:`LUKS_OFFSET` metadata."""
        from popek.storage.dirpool import ITER_TIME_MS, SECRET_ID, run_tool

        run_tool(["qemu-img", "create", "-f", "luks", "-o",
              f"key-secret={SECRET_ID},iter-time={ITER_TIME_MS}", self._spec(project, name),
              str(size)], f"creating encrypted volume {name}", key)
        with self._image(project, name) as image:
            offset = int(image.size()) - size
            image.metadata_set(LUKS_OFFSET, str(offset))

    @staticmethod
    def _offset(image: Any) -> int:
        """The bytes of the LUKS header before an encrypted image's data (0: plain)."""
        try:
            return int(image.metadata_get(LUKS_OFFSET))
        except KeyError:  # no such metadata: a plain image
            return 0

    def resize(self, project: str, name: str, kind: str, size: int, old: int,
               key: str | None = None) -> None:
        """Set the size the guest sees to ``size`` (an encrypted image's header added)."""
        with self._image(project, name) as image:
            image.resize(size + self._offset(image))

    def delete(self, project: str, name: str, kind: str, snapshots: tuple[str, ...] = ()) -> None:
        """Remove the image and every snapshot of it (gone already: nothing to do)."""
        _, rbd = _bindings()
        with self._io() as ioctx:
            try:
                image = rbd.Image(ioctx, self.image(project, name))
            except rbd.ImageNotFound:
                return
            try:
                for snap in list(image.list_snaps()):
                    self._drop_snap(image, name, snap["name"])
            finally:
                image.close()
            try:
                rbd.RBD().remove(ioctx, self.image(project, name))
            except rbd.ImageNotFound:
                return

    def _drop_snap(self, image: Any, name: str, snap: str) -> None:
        _, rbd = _bindings()
        if image.is_protected_snap(snap):
            try:
                image.unprotect_snap(snap)
            except rbd.ImageBusy as exc:
                kids = ", ".join(c["image"] for c in image.list_children2()) or "some"
                raise EngineError(f"snapshot {name}@{snap} still has clones ({kids})") from exc
        image.remove_snap(snap)

    def has_snapshot(self, project: str, name: str, snap: str) -> bool:
        """Whether the image has snapshot ``snap``."""
        with self._image(project, name, read_only=True) as image:
            return any(s["name"] == snap for s in image.list_snaps())

    def snapshot(self, project: str, name: str, snap: str, key: str | None = None) -> None:
        """Take RBD snapshot ``snap`` (there already: nothing to do)."""
        if not self.has_snapshot(project, name, snap):
            with self._image(project, name) as image:
                image.create_snap(snap)

    def restore(self, project: str, name: str, snap: str, key: str | None = None) -> None:
        """Roll the image back to ``snap`` (the same again is harmless: roll forward)."""
        with self._image(project, name) as image:
            image.rollback_to_snap(snap)

    def clone(self, project: str, name: str, snap: str, new: str,
              key: str | None = None) -> None:
        """Make ``new`` a copy-on-write clone of snapshot ``snap`` of ``name`` (the snapshot
        is protected first, as RBD needs)."""
        _, rbd = _bindings()
        with self._image(project, name) as image:
            if not image.is_protected_snap(snap):
                image.protect_snap(snap)
            offset = self._offset(image)
        with self._io() as ioctx:
            rbd.RBD().clone(ioctx, self.image(project, name), snap, ioctx,
                            self.image(project, new), features=FEATURES)
        if offset:  # an encrypted parent: the clone shares its LUKS header (and key)
            with self._image(project, new) as image:
                image.metadata_set(LUKS_OFFSET, str(offset))

    def delete_snapshot(self, project: str, name: str, snap: str, others: list[str],
                        key: str | None = None) -> None:
        """Remove snapshot ``snap`` (gone: nothing to do); refused while clones depend on
        it, naming them."""
        with self._image(project, name) as image:
            if any(s["name"] == snap for s in image.list_snaps()):
                self._drop_snap(image, name, snap)

    def used(self, project: str, name: str, kind: str) -> int:
        """The bytes of the image's own objects (its parent's not counted; 0 when missing)."""
        try:
            with self._image(project, name, read_only=True) as image:
                total = [0]

                def add(_offset: int, length: int, exists: bool) -> None:
                    if exists:
                        total[0] += length

                image.diff_iterate(0, image.size(), None, add, include_parent=False,
                                   whole_object=True)
                return total[0]
        except EngineError:
            return 0

    def virtual_size(self, project: str, name: str, kind: str) -> int:
        """The image's size (``NAME@SNAP``: the snapshot's)."""
        base, _, snap = name.partition("@")
        with self._image(project, base, snap or None, read_only=True) as image:
            return int(image.size()) - self._offset(image)

    def exists(self, project: str, name: str, kind: str) -> bool:
        """Whether the image is there."""
        return any(n == name for p, n, _ in self.files() if p == project)

    def files(self) -> list[tuple[str, str, str]]:
        """Every image of this pool (its prefix): (project, name, "block")."""
        _, rbd = _bindings()
        out = []
        with self._io() as ioctx:
            for image in rbd.RBD().list(ioctx):
                prefix, _, rest = str(image).partition(".")
                project, _, name = rest.partition(".")
                if prefix == self.prefix and project and name:
                    out.append((project, name, "block"))
        return sorted(out)

    def remove_temporary(self, project: str, name: str, kind: str) -> None:
        """Nothing: an image is made under its own name (its record says ``creating``)."""

    # -- import and export ----------------------------------------------------------
    def _spec(self, project: str, name: str) -> str:
        c = self.config
        return rbd_spec(c["pool"], self.image(project, name), c.get("client", DEFAULT_CLIENT),
                        c["conf"], c["keyring"])

    def import_file(self, project: str, name: str, source: Path, fmt: str,
                    progress: Callable[[int], None], key: str | None = None) -> None:
        """Make the image of ``name`` and ``qemu-img convert`` ``source`` into it."""
        from popek.storage.dirpool import probe

        _, size = probe(source)
        self.create(project, name, "block", size)
        run_convert(["-n", "--target-is-zero", "-f", fmt, str(source), "-O", "raw",
                     self._spec(project, name)], f"importing {source.name}", progress)

    def export_file(self, project: str, name: str, target: Path, fmt: str,
                    progress: Callable[[int], None], key: str | None = None) -> None:
        """Write the image of ``name`` to the new file ``target`` as ``fmt`` (an encrypted
        one is refused: its data would leave the cluster in clear)."""
        if key:
            raise InvalidInput(f"volume {name} is encrypted: exporting it is not "
                               "offered (its data would leave in clear); attach it to a VM "
                               "and copy the data there")
        with made(target) as tmp:
            run_convert(["-f", "raw", self._spec(project, name), "-O", fmt,
                         *(["-o", "preallocation=off"] if fmt == "qcow2" else []), str(tmp)],
                        f"exporting volume {name}", progress)
