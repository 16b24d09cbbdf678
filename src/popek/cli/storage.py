"""``popek storage``: pools of volumes, and ``popek storage volume``: the volumes.

Registered by :mod:`popek.cli.main` as ``app.add_typer(storage_app, name="storage")``.
A pool is named ``[REMOTE:]POOL`` (``lab:fast``: pool ``fast`` of remote
``lab``); its volumes belong to the project the command acts in.
"""

from __future__ import annotations

from typing import Any

import click
import typer

from popek.cli import remotes, scope
from popek.cli.common import columns_option, format_option, project_option, remote_argument
from popek.cli.output import Column, details, listing

app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Storage pools and their volumes (popek storage volume --help).")
volume_app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False,
                         help="Create, list, inspect, resize and delete volumes of a pool.")
app.add_typer(volume_app, name="volume")

POOL_ARG = "[REMOTE:]POOL"


def human(size: object) -> str:
    """Bytes in the largest binary unit, one decimal (``1.5GiB``); ``-`` for none."""
    if not isinstance(size, int):
        return "-"
    value, unit = float(size), "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            break
        value /= 1024
    return f"{int(value)}{unit}" if value == int(value) else f"{value:.1f}{unit}"


def _api(remote: str) -> Any:
    from popek.cli import remoteops

    return remoteops.client(remote)


def _pool_path(name: str) -> str:
    from urllib.parse import quote

    return f"/1.0/storage-pools/{quote(name, safe='')}"


def _core() -> Any:
    from popek.cli.ops import core

    return core()


def _storage() -> Any:
    from popek.storage.service import Storage

    return Storage(_core().store)


def _settings(pairs: list[str]) -> dict[str, str]:
    from popek.errors import InvalidInput

    out: dict[str, str] = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key:
            raise InvalidInput(f"invalid pool setting {pair!r}: write KEY=VALUE (path=/srv/pool)")
        out[key] = value
    return out


@app.command()
def create(
    name: str = typer.Argument(..., metavar=POOL_ARG,
                               help="Pool name: a-z, 0-9 and '-' (lab:NAME: on remote lab)."),
    driver: str = typer.Argument(..., help="The driver: dir (volumes as files) or ceph "
                                           "(volumes as RBD images of a Ceph cluster)."),
    settings: list[str] = typer.Argument(None, metavar="[KEY=VALUE]...",
                                         help="Driver settings; dir: path=/an/empty/dir "
                                              "(default: one under POPEK_HOME/storage); ceph: "
                                              "conf=/etc/ceph/ceph.conf keyring=PATH "
                                              "pool=RBD_POOL [client=admin]."),
) -> None:
    """Create a storage pool (host admin)."""
    config = _settings(settings or [])
    where = remotes.locate(name, "pool")
    if where is not None:
        rec = _api(where[0]).call("POST", "/1.0/storage-pools",
                                  json={"name": where[1], "driver": driver, "config": config})
    else:
        from popek.core.requests import PoolCreate

        rec = _core().handle(PoolCreate(name, driver, config))
    print(f"Storage pool {rec['name']} created ({rec['driver']}, {_where(rec)}, "
          f"{human(rec['free'])} free" + (f", {rec['health']}" if rec["driver"] == "ceph"
                                          else "") + ").")


def _where(rec: dict[str, Any]) -> str:
    """Where a pool's volumes are: its directory, or ``ceph:POOL``."""
    config = rec["config"]
    return str(config["path"]) if "path" in config else f"ceph:{config.get('pool', '?')}"


POOL_COLUMNS = (
    Column("NAME", lambda r: r["name"], "n"),
    Column("DRIVER", lambda r: r["driver"], "d"),
    Column("PATH", _where, "p"),
    Column("SIZE", lambda r: human(r["size"]), "s"),
    Column("USED", lambda r: human(r["used"]), "u"),
    Column("FREE", lambda r: human(r["free"]), "f"),
    Column("VOLUMES", lambda r: r["volumes"], "v"),
    Column("HEALTH", lambda r: r["health"], "h"),
)


@app.command("list")
def list_(remote: str | None = remote_argument(), fmt: str = format_option(),
          columns: str = columns_option(POOL_COLUMNS)) -> None:
    """List the storage pools with their size, used and free bytes."""
    on = remotes.list_target(remote, "popek storage list")
    if on is not None:
        rows = _api(on).call("GET", "/1.0/storage-pools")
    else:
        storage = _storage()
        rows = [storage.pool_info(p.name) for p in storage.pools()]
    listing(rows, POOL_COLUMNS, fmt, select=columns, command="popek storage list")


@app.command()
def info(name: str = typer.Argument(..., metavar=POOL_ARG, help="The pool (lab:NAME: on remote "
                                                                   "lab)."),
         fmt: str = format_option()) -> None:
    """Show a storage pool: driver, settings, size, used, free, provisioned and health."""
    where = remotes.locate(name, "pool")
    if where is not None:
        rec = _api(where[0]).call("GET", _pool_path(where[1]))
    else:
        rec = _storage().pool_info(name)
    details(rec, [("name", rec["name"]), ("driver", rec["driver"]),
                  *((k, v) for k, v in rec["config"].items()),
                  ("size", human(rec["size"])), ("used", human(rec["used"])),
                  ("free", human(rec["free"])), ("provisioned", human(rec["provisioned"])),
                  ("volumes", rec["volumes"]), ("health", rec["health"]),
                  ("created", rec["created"])], fmt)


@app.command()
def delete(name: str = typer.Argument(..., metavar=POOL_ARG,
                                     help="The pool (lab:NAME: on remote lab).")) -> None:
    """Delete an empty storage pool (host admin); its directory goes if popek made it."""
    where = remotes.locate(name, "pool")
    if where is not None:
        _api(where[0]).call("DELETE", _pool_path(where[1]))
        short = where[1]
    else:
        from popek.core.requests import PoolDelete

        _core().handle(PoolDelete(name))
        short = name
    print(f"Storage pool {short} deleted.")


# -- volumes ---------------------------------------------------------------------------

VOLUME_COLUMNS = (
    Column("POOL", lambda r: r["pool"], "p"),
    Column("NAME", lambda r: r["name"], "n"),
    Column("PROJECT", lambda r: r["project"], "j", default=False),
    Column("TYPE", lambda r: r["type"], "t"),
    Column("SIZE", lambda r: human(r["size"]), "s"),
    Column("STATE", lambda r: r["state"], "S"),
    Column("ATTACHED", lambda r: ",".join(r.get("holders") or [r["attached"]]) or "-", "a"),
    Column("ENCRYPTED", lambda r: "yes" if r.get("encrypted") else "no", "e", default=False),
)


def _size(text: str) -> int:
    from popek.units import parse_size

    return parse_size(text, "volume size")


def _volumes_path(pool: str, name: str = "") -> str:
    from urllib.parse import quote

    return f"{_pool_path(pool)}/volumes" + (f"/{quote(name, safe='')}" if name else "")


def _show_volume(rec: dict[str, Any], fmt: str) -> None:
    details(rec, [("pool", rec["pool"]), ("name", rec["name"]), ("project", rec["project"]),
                  ("type", rec["type"]), ("size", human(rec["size"])),
                  ("used", human(rec.get("used"))), ("state", rec["state"]),
                  ("attached", ", ".join(rec.get("holders") or [rec["attached"]]) or "-"),
                  ("shared", "yes" if rec.get("shared") else "no"), ("created", rec["created"]),
                  ("encrypted", "yes" if rec.get("encrypted") else "no"),
                  *sorted((rec.get("config") or {}).items())], fmt)


@volume_app.command("create")
def volume_create(
    pool: str = typer.Argument(..., metavar=POOL_ARG, help="The pool (lab:POOL: on remote lab)."),
    name: str = typer.Argument(..., help="Volume name: a-z, 0-9 and '-'."),
    size: str = typer.Option(..., "--size", help="Its size, e.g. 10GiB (thin: space is taken "
                                                 "as data is written)."),
    kind: str = typer.Option("block", "--type", help="block (a disk for a VM) or filesystem "
                                                     "(ext4, for a container)."),
    encrypt: bool = typer.Option(False, "--encrypt", help="Encrypt it at rest (a block "
                                 "volume under the project's key: dir, qcow2 with LUKS; "
                                 "ceph, LUKS over the RBD image)."),
    shared: bool = typer.Option(False, "--shared", help="Let several containers hold it at "
                                "once (security.shared=true; filesystem volumes only)."),
    project: str | None = project_option(),
) -> None:
    """Create a volume in a pool, in the project."""
    bytes_ = _size(size)
    where = remotes.locate(pool, "pool")
    if where is not None:
        rec = _api(where[0]).call("POST", _volumes_path(where[1]), params={"project": project},
                                  json={"name": name, "size": bytes_, "type": kind,
                                        "encrypt": encrypt, "shared": shared})
    else:
        scope.use(project)
        from popek.core.requests import VolumeCreate

        rec = _core().handle(VolumeCreate(pool, name, bytes_, kind, encrypt, shared))
    how = (", encrypted" if rec.get("encrypted") else "") + (
        ", shared" if rec.get("shared") else "")
    print(f"Volume {rec['pool']}/{rec['name']} created ({rec['type']}, {human(rec['size'])}"
          f"{how}).")


@volume_app.command("list")
def volume_list(
    pool: str | None = typer.Argument(None, metavar="[[REMOTE:]POOL]",
                                      help="One pool (default: every pool; lab: every pool "
                                           "of remote lab)."),
    fmt: str = format_option(), columns: str = columns_option(VOLUME_COLUMNS),
    project: str | None = project_option(),
) -> None:
    """List the project's volumes (of one pool, or of every one)."""
    remote, one = _pool_or_remote(pool)
    if remote is not None:
        path = _volumes_path(one) if one else "/1.0/storage-volumes"
        rows = _api(remote).call("GET", path, params={"project": project})
    else:
        scope.use(project)
        from popek.storage.service import Storage, public

        core = _core()
        storage = Storage(core.store)
        if one:
            storage.pool(one)  # NotFound for an unknown pool
        rows = [public(v) for v in storage.volumes(one or None, core.project)]
    listing(rows, VOLUME_COLUMNS, fmt, select=columns, command="popek storage volume list")


def _pool_or_remote(pool: str | None) -> tuple[str | None, str]:
    """(remote, pool) for ``volume list``'s argument: ``lab:`` is every pool of ``lab``."""
    if pool is not None and pool.endswith(":"):
        return remotes.list_target(pool, "popek storage volume list"), ""
    if pool is None:
        return remotes.list_target(None, "popek storage volume list"), ""
    where = remotes.locate(pool, "pool")
    return (None, pool) if where is None else where


@volume_app.command("info")
def volume_info(
    pool: str = typer.Argument(..., metavar=POOL_ARG, help="The pool (lab:POOL: on remote lab)."),
    name: str = typer.Argument(..., help="The volume."),
    fmt: str = format_option(), project: str | None = project_option(),
) -> None:
    """Show a volume: type, size, what its file takes, state, the instance it is attached to."""
    where = remotes.locate(pool, "pool")
    if where is not None:
        rec = _api(where[0]).call("GET", _volumes_path(where[1], name),
                                  params={"project": project})
    else:
        scope.use(project)
        from popek.storage.service import Storage

        core = _core()
        rec = Storage(core.store).volume_info(pool, core.project, name)
    _show_volume(rec, fmt)


@volume_app.command("resize")
def volume_resize(
    pool: str = typer.Argument(..., metavar=POOL_ARG, help="The pool (lab:POOL: on remote lab)."),
    name: str = typer.Argument(..., help="The volume."),
    size: str = typer.Argument(..., help="The new size, e.g. 20GiB (a block volume only grows)."),
    project: str | None = project_option(),
) -> None:
    """Grow a volume (a detached filesystem volume may also shrink while its data fits)."""
    bytes_ = _size(size)
    where = remotes.locate(pool, "pool")
    if where is not None:
        rec = _api(where[0]).call("PATCH", _volumes_path(where[1], name),
                                  params={"project": project}, json={"size": bytes_})
    else:
        scope.use(project)
        from popek.core.requests import VolumeResize

        rec = _core().handle(VolumeResize(pool, name, bytes_))
    print(f"Volume {rec['pool']}/{rec['name']} resized to {human(rec['size'])}.")


@volume_app.command("set")
def volume_set(
    pool: str = typer.Argument(..., metavar=POOL_ARG, help="The pool (lab:POOL: on remote lab)."),
    name: str = typer.Argument(..., help="The volume."),
    pairs: list[str] = typer.Argument(..., metavar="KEY=VALUE...",
                                      help="limits.disk.read_bps or write_bps (e.g. 10MB: "
                                           "bytes per second), limits.disk.read_iops or "
                                           "write_iops (operations per second); 0: no limit; "
                                           "security.shared=true|false (a filesystem volume "
                                           "several containers hold at once)."),
    project: str | None = project_option(),
) -> None:
    """Set a volume's I/O limits (at once on the running instances it is attached to) or
    mark it shared (security.shared=true: filesystem volumes only)."""
    from popek.errors import InvalidInput
    from popek.storage.service import CONFIG_KEYS as KEYS

    config: dict[str, str] = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or key not in KEYS:
            raise InvalidInput(f"invalid setting {pair!r}: write KEY=VALUE with KEY one of "
                               f"{', '.join(KEYS)}")
        config[key] = value
    where = remotes.locate(pool, "pool")
    if where is not None:
        rec = _api(where[0]).call("POST", _volumes_path(where[1], name) + "/config",
                                  params={"project": project}, json={"config": config})
    else:
        scope.use(project)
        from popek.core.requests import VolumeSet

        rec = _core().handle(VolumeSet(pool, name, config))
    shown = ", ".join(f"{k}={v}" for k, v in sorted((rec.get("config") or {}).items()))
    print(f"Volume {rec['pool']}/{rec['name']}: {shown or 'no I/O limits, not shared'}.")


@volume_app.command("delete")
def volume_delete(
    pool: str = typer.Argument(..., metavar=POOL_ARG, help="The pool (lab:POOL: on remote lab)."),
    name: str = typer.Argument(..., help="The volume."),
    project: str | None = project_option(),
) -> None:
    """Delete a volume and its data (refused while it is attached)."""
    where = remotes.locate(pool, "pool")
    if where is not None:
        _api(where[0]).call("DELETE", _volumes_path(where[1], name), params={"project": project})
        short = where[1]
    else:
        scope.use(project)
        from popek.core.requests import VolumeDelete

        _core().handle(VolumeDelete(pool, name))
        short = pool
    print(f"Volume {short}/{name} deleted.")


def _snapshot_path(pool: str, name: str, snap: str = "") -> str:
    from urllib.parse import quote

    return f"{_volumes_path(pool, name)}/snapshots" + (f"/{quote(snap, safe='')}" if snap else "")


def _on(pool: str) -> tuple[str, str] | None:
    return remotes.locate(pool, "pool")


@volume_app.command("snapshot")
def volume_snapshot(
    pool: str = typer.Argument(..., metavar=POOL_ARG, help="The pool (lab:POOL: on remote lab)."),
    name: str = typer.Argument(..., help="The block volume."),
    snapshot: str = typer.Argument(..., help="The snapshot's name: a-z, 0-9 and '-'."),
    project: str | None = project_option(),
) -> None:
    """Take a snapshot of a volume (a block volume, detached or its VM stopped: constant
    time, copy on write from then on; a filesystem volume, also while mounted in running
    containers, frozen for the time: a copy, reflinked where the pool's file system can)."""
    where = _on(pool)
    if where is not None:
        _api(where[0]).call("POST", _snapshot_path(where[1], name), params={"project": project},
                            json={"name": snapshot})
    else:
        scope.use(project)
        from popek.core.requests import VolumeSnapshot

        _core().handle(VolumeSnapshot(pool, name, snapshot))
    print(f"Snapshot {name}@{snapshot} taken.")


@volume_app.command("restore")
def volume_restore(
    pool: str = typer.Argument(..., metavar=POOL_ARG, help="The pool (lab:POOL: on remote lab)."),
    name: str = typer.Argument(..., help="The block volume."),
    snapshot: str = typer.Argument(..., help="The snapshot to go back to."),
    project: str | None = project_option(),
) -> None:
    """Put a volume back as it was at a snapshot: what was written since is lost."""
    where = _on(pool)
    if where is not None:
        _api(where[0]).call("POST", f"{_snapshot_path(where[1], name, snapshot)}/restore",
                            params={"project": project})
    else:
        scope.use(project)
        from popek.core.requests import VolumeRestore

        _core().handle(VolumeRestore(pool, name, snapshot))
    print(f"Volume {name} restored to {snapshot}.")


@volume_app.command("clone")
def volume_clone(
    pool: str = typer.Argument(..., metavar=POOL_ARG, help="The pool (lab:POOL: on remote lab)."),
    name: str = typer.Argument(..., help="The block volume."),
    snapshot: str = typer.Argument(..., help="Its snapshot to clone."),
    new: str = typer.Argument(..., help="The new volume's name."),
    project: str | None = project_option(),
) -> None:
    """Make a new volume from a snapshot: copy on write, constant time whatever the size."""
    where = _on(pool)
    if where is not None:
        rec = _api(where[0]).call("POST", f"{_snapshot_path(where[1], name, snapshot)}/clone",
                                  params={"project": project}, json={"name": new})
    else:
        scope.use(project)
        from popek.core.requests import VolumeClone

        rec = _core().handle(VolumeClone(pool, name, snapshot, new))
    print(f"Volume {rec['pool']}/{rec['name']} cloned from {name}@{snapshot} "
          f"({human(rec['size'])}).")


@volume_app.command("snapshot-delete")
def volume_snapshot_delete(
    pool: str = typer.Argument(..., metavar=POOL_ARG, help="The pool (lab:POOL: on remote lab)."),
    name: str = typer.Argument(..., help="The block volume."),
    snapshot: str = typer.Argument(..., help="The snapshot to delete."),
    project: str | None = project_option(),
) -> None:
    """Delete a snapshot (its data merged into what it backs; refused while cloned from)."""
    where = _on(pool)
    if where is not None:
        _api(where[0]).call("DELETE", _snapshot_path(where[1], name, snapshot),
                            params={"project": project})
    else:
        scope.use(project)
        from popek.core.requests import VolumeSnapshotDelete

        _core().handle(VolumeSnapshotDelete(pool, name, snapshot))
    print(f"Snapshot {name}@{snapshot} deleted.")


@volume_app.command("import")
def volume_import(
    pool: str = typer.Argument(..., metavar=POOL_ARG, help="The pool (lab:POOL: on remote lab)."),
    name: str = typer.Argument(..., help="The new block volume."),
    file: str = typer.Argument(..., help="A qcow2 or raw disk image (self-contained: no "
                                         "backing file)."),
    encrypt: bool = typer.Option(False, "--encrypt", help="Encrypt the new volume at rest "
                                 "(qcow2 with LUKS, under the project's key)."),
    project: str | None = project_option(),
) -> None:
    """Make a block volume from a disk image file, with progress."""
    from popek.cli import ops

    where = _on(pool)
    if where is not None:
        from popek.errors import InvalidInput

        api = _api(where[0])
        try:
            upload = open(file, "rb")  # noqa: SIM115 - closed below, streamed meanwhile
        except OSError as exc:
            raise InvalidInput(f"cannot read {file!r}: {exc.strerror}") from exc
        with upload, ops.progress(f"sending {file} to remote {where[0]}") as step:
            op = api.call("POST", f"{_volumes_path(where[1], name)}/import", content=upload,
                          params={"project": project, "encrypt": encrypt or None},
                          timeout=3600)
            rec = api.wait(op, step)
    else:
        scope.use(project)
        from pathlib import Path

        from popek.core.requests import VolumeImport

        with ops.progress(f"importing {file}") as step:
            rec = _core().handle(VolumeImport(pool, name, str(Path(file).absolute()),
                                              progress=step, encrypt=encrypt))
    print(f"Volume {rec['pool']}/{rec['name']} imported from {file} ({human(rec['size'])}).")


@volume_app.command("export")
def volume_export(
    pool: str = typer.Argument(..., metavar=POOL_ARG, help="The pool (lab:POOL: on remote lab)."),
    name: str = typer.Argument(..., help="The block volume."),
    file: str = typer.Argument(..., help="The new file to write (never overwritten)."),
    fmt: str = typer.Option("qcow2", "--format", help="qcow2 (thin) or raw.",
                            click_type=click.Choice(["qcow2", "raw"])),
    project: str | None = project_option(),
) -> None:
    """Write a block volume to a disk image file (its snapshots flattened in), with progress."""
    from popek.cli import ops

    where = _on(pool)
    if where is not None:
        _download(where[0], f"{_volumes_path(where[1], name)}/export",
                  {"project": project, "format": fmt}, file)
    else:
        scope.use(project)
        from pathlib import Path

        from popek.core.requests import VolumeExport

        with ops.progress(f"exporting {name}") as step:
            _core().handle(VolumeExport(pool, name, str(Path(file).absolute()), fmt,
                                        progress=step))
    print(f"Volume {name} exported to {file} ({fmt}).")


def _download(remote: str, path: str, params: dict[str, Any], file: str) -> None:
    """Stream ``GET path`` of ``remote`` into the new ``file`` (removed again on failure)."""
    import os

    from popek.errors import AlreadyExists, InvalidInput

    api = _api(remote)
    try:
        fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError as exc:
        raise AlreadyExists(f"{file} exists: popek does not overwrite a file; name a "
                            "new one") from exc
    except OSError as exc:
        raise InvalidInput(f"cannot write {file!r}: {exc.strerror}") from exc
    try:
        with os.fdopen(fd, "wb") as out:
            api.download(path, params, out)
    except BaseException:
        os.unlink(file)
        raise


def _volume_ref(ref: str) -> tuple[str | None, str, str]:
    """``[REMOTE:]POOL/VOLUME`` -> (remote or None, pool, volume)."""
    from popek.storage.service import Storage

    where = remotes.locate(ref, "volume")
    pool, name = Storage.parse_ref(ref if where is None else where[1])
    return (None if where is None else where[0]), pool, name


@volume_app.command("attach")
def volume_attach(
    volume: str = typer.Argument(..., metavar="[REMOTE:]POOL/VOLUME",
                                 help="The volume (lab:POOL/VOLUME: on remote lab)."),
    instance: str = typer.Argument(..., help="The instance: a VM takes a block volume as a "
                                   "disk, a container a filesystem volume."),
    path: str = typer.Option("", "--path", help="Where a container mounts it (default "
                             "/mnt/VOLUME)."),
    project: str | None = project_option(),
) -> None:
    """Attach a volume to an instance, plugged in at once when it runs (a VM's disk
    /dev/disk/by-id/virtio-VOLUME; a container's mount, owned by its root)."""
    remote, pool, name = _volume_ref(volume)
    if remote is not None:
        _api(remote).call("POST", f"{_volumes_path(pool, name)}/attach",
                          params={"project": project}, json={"instance": instance,
                                                             "path": path})
    else:
        scope.use(project)
        from popek.core.requests import VolumeAttach

        _core().handle(VolumeAttach(pool, name, instance, path))
    print(f"Volume {pool}/{name} attached to {instance}.")


@volume_app.command("detach")
def volume_detach(
    volume: str = typer.Argument(..., metavar="[REMOTE:]POOL/VOLUME",
                                 help="The volume (lab:POOL/VOLUME: on remote lab)."),
    instance: str = typer.Argument(..., help="The instance it is attached to."),
    project: str | None = project_option(),
) -> None:
    """Detach a volume from an instance (unplugged first when it runs)."""
    remote, pool, name = _volume_ref(volume)
    if remote is not None:
        _api(remote).call("POST", f"{_volumes_path(pool, name)}/detach",
                          params={"project": project}, json={"instance": instance})
    else:
        scope.use(project)
        from popek.core.requests import VolumeDetach

        _core().handle(VolumeDetach(pool, name, instance))
    print(f"Volume {pool}/{name} detached from {instance}.")
