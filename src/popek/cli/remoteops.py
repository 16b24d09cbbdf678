"""The instance commands on a remote: :mod:`popek.cli.ops`'s verbs through its REST API.

:mod:`popek.cli.ops` and :mod:`popek.cli.config` hand a command here when it
names ``REMOTE:NAME`` (see :mod:`popek.cli.remotes`).  The API answers the same
JSON as ``--format json``, printed by the same code as locally, so a command
prints the same on a remote as on its host; its errors end the command with the
same line and exit code (:class:`popek.cli.remoteclient.RemoteError`).
"""

from __future__ import annotations

import sys
from typing import Any
from urllib.parse import quote

from popek.cli import remotes
from popek.cli.remoteclient import Client


def client(remote: str) -> Client:
    """The API client of the remote called ``remote`` (which audits what it is sent)."""
    from popek.cli import ops

    ops.REMOTES.append(remote)
    return Client(remotes.get(remote))


def _path(name: str, tail: str = "") -> str:
    return f"/1.0/instances/{name}{tail}"


def launch(remote: str, name: str, params: dict[str, Any], project: str | None) -> None:
    """``popek launch IMAGE REMOTE:NAME ...``: the launch operation, waited on."""
    from popek.cli import ops
    from popek.core.config import parse_pairs
    from popek.units import format_size

    volumes, sizes = ops.split_disks(params["disk"])
    body: dict[str, Any] = {
        "image": params["image"], "name": name,
        "engine": "container" if params["container"] else "qemu",
        "vcpus": params["vcpus"], "memory": params["memory"], "accel": params["accel"],
        "runtime": params["runtime"], "pids": params["pids"],
        "disk": next(iter(sizes), None), "volumes": volumes,
        "net_rate": params["net_rate"], "mounts": list(params["mount"]),
        "networks": list(params["network"]), "label": params["label"],
        "profiles": list(params["profile"]), "config": parse_pairs(params["config"]),
        "timeout": params["timeout"]}
    api = client(remote)
    with ops.progress(f"launching {name}") as step:
        op = api.call("POST", "/1.0/instances", json=body, params={"project": project})
        api.wait(op, step)
    data = api.call("GET", _path(name), params={"project": project})
    how = data.get("accel") or data.get("runtime") or "?"
    kind = "container" if data.get("engine") == "container" else "VM"
    print(f"Instance {name} is running ({kind}, {how}, {data.get('vcpus')} vCPU, "
          f"{format_size(int(data.get('memory') or 0))}).")


def list_(remote: str, fmt: str, columns: str, project: str | None,
          all_projects: bool) -> None:
    """``popek list REMOTE:``: the remote's instances, printed as locally."""
    from popek.cli import ops

    records = client(remote).call("GET", "/1.0/instances",
                                  params={"project": project,
                                          "all_projects": all_projects or None})
    ops.show_list(records, fmt, columns, all_projects)


def info(remote: str, name: str, fmt: str, project: str | None) -> None:
    """``popek info REMOTE:NAME``."""
    from popek.cli import ops

    ops.show_info(client(remote).call("GET", _path(name), params={"project": project}), fmt)


def change(remote: str, name: str, action: str, project: str | None,
           timeout: float | None = None, force: bool = False) -> Any:
    """Start, stop, restart, pause or resume; the operation's result (or the instance)."""
    from popek.cli import ops

    api = client(remote)
    body = {"action": action, "timeout": timeout, "force": force}
    verb = {"stop": "stopping", "restart": "restarting", "start": "starting"}.get(action)
    if verb is None:  # pause, resume: answered when done
        return api.call("PUT", _path(name, "/state"), json=body, params={"project": project})
    with ops.progress(f"{verb} {name}") as step:
        op = api.call("PUT", _path(name, "/state"), json=body, params={"project": project})
        return api.wait(op, step)


def delete(remote: str, name: str, force: bool, project: str | None) -> None:
    """``popek delete REMOTE:NAME``."""
    api = client(remote)
    op = api.call("DELETE", _path(name), params={"project": project, "force": force})
    api.wait(op, lambda _: None)  # quiet, as the local delete


def exec_(remote: str, name: str, command: list[str], timeout: float, no_stdin: bool,
          project: str | None) -> int:
    """``popek exec REMOTE:NAME -- CMD``, without a terminal: output and exit code pass through."""
    stdin = b"" if no_stdin or sys.stdin.isatty() else sys.stdin.buffer.read()
    result = client(remote).call(
        "POST", _path(name, "/exec"), params={"project": project},
        json={"command": command, "stdin": stdin.decode(errors="replace"), "timeout": timeout},
        timeout=timeout + 30)
    sys.stdout.write(result.get("stdout", ""))
    sys.stdout.flush()
    sys.stderr.write(result.get("stderr", ""))
    sys.stderr.flush()
    return int(result.get("exit_code", 1))


def sandbox_run(remote: str, command: list[str], profile: str, net: bool, ro: list[str],
                rw: list[str], memory: str | None, timeout: float | None) -> int:
    """``popek sandbox run REMOTE: -- CMD``: no terminal, its whole input first (as
    :func:`exec_`); the output and exit code pass through.  Host paths (``--ro``, ``--rw``)
    are the remote host's, for its host admin only (the API refuses a token)."""
    stdin = b"" if sys.stdin.isatty() else sys.stdin.buffer.read()
    body: dict[str, Any] = {"command": command, "profile": profile, "network": net,
                            "ro": ro, "rw": rw, "memory": memory,
                            "stdin": stdin.decode(errors="replace")}
    if timeout is not None:
        body["timeout"] = timeout
    result = client(remote).call("POST", "/1.0/sandboxes/run", json=body,
                                 timeout=(timeout or 60.0) + 30)
    sys.stdout.write(result.get("stdout", ""))
    sys.stdout.flush()
    sys.stderr.write(result.get("stderr", ""))
    sys.stderr.flush()
    return int(result.get("exit_code", 1))


def image_build(remote: str, name: str, force: bool, sign: bool, key: str,
                project: str | None) -> dict[str, Any]:
    """``popek image build REMOTE:NAME``: the build operation, waited on with its progress;
    the new image's ``image list`` record."""
    from popek.cli import ops

    api = client(remote)
    with ops.progress(f"building image {name}") as step:
        op = api.call("POST", "/1.0/images", params={"project": project},
                      json={"name": name, "force": force, "sign": sign, "key": key})
        data: dict[str, Any] = api.wait(op, step)
    return data


def image_import(remote: str, file: str, name: str, force: bool, sign: bool, key: str,
                 project: str | None) -> dict[str, Any]:
    """``popek image import FILE REMOTE:NAME``: the file sent (an OCI layout directory as a
    tar of it), then the import operation waited on; the new image's record."""
    import os
    import tarfile
    import tempfile

    from popek.cli import ops
    from popek.errors import InvalidInput

    api = client(remote)
    with tempfile.TemporaryDirectory(prefix="popek-import-") as tmp:
        path = file
        if os.path.isdir(file):  # an OCI image layout directory: sent as its tar
            path = os.path.join(tmp, "layout.tar")
            with tarfile.open(path, "w") as tar:
                tar.add(file, arcname=".")
        try:
            upload = open(path, "rb")  # noqa: SIM115 - closed below, streamed meanwhile
        except OSError as exc:
            raise InvalidInput(f"cannot read the image file {file!r}: {exc.strerror}") from exc
        with upload, ops.progress(f"sending {file} to remote {remote}") as step:
            op = api.call("POST", "/1.0/images/import", content=upload, timeout=3600,
                          params={"name": name, "force": force, "sign": sign, "key": key,
                                  "project": project})
            step(f"importing {file}")
            data: dict[str, Any] = api.wait(op, step)
    return data


def config(remote: str, name: str, project: str | None) -> dict[str, Any]:
    """``popek config show REMOTE:NAME --format json``'s data."""
    data: dict[str, Any] = client(remote).call("GET", _path(name, "/config"),
                                               params={"project": project})
    return data


def config_patch(remote: str, name: str, values: dict[str, str | None],
                 project: str | None) -> dict[str, Any]:
    """Set (a value) and unset (``None``) keys; the config afterwards."""
    data: dict[str, Any] = client(remote).call("PATCH", _path(name, "/config"), json=values,
                                               params={"project": project})
    return data


def attach(remote: str, name: str, network: str, ipv4: str | None,
           project: str | None) -> dict[str, Any]:
    """``popek network attach NETWORK REMOTE:NAME``: the port made."""
    port: dict[str, Any] = client(remote).call(
        "POST", _path(name, "/networks"), json={"network": network, "ipv4": ipv4},
        params={"project": project})
    return port


def detach(remote: str, name: str, network: str, project: str | None) -> None:
    """``popek network detach NETWORK REMOTE:NAME``."""
    client(remote).call("DELETE", _path(name, f"/networks/{network}"),
                        params={"project": project})


def console_log(remote: str, name: str, project: str | None) -> bytes:
    """``popek console REMOTE:NAME --log``: what its console wrote."""
    return client(remote).content(_path(name, "/console/log"), params={"project": project})


def attest(remote: str, name: str, nonce: str, project: str | None) -> dict[str, Any]:
    """``popek attest REMOTE:NAME --nonce HEX``: the remote host's signed quote."""
    quote: dict[str, Any] = client(remote).call("POST", _path(name, "/attest"),
                                                json={"nonce": nonce},
                                                params={"project": project})
    return quote


def projects(remote: str) -> list[dict[str, Any]]:
    """``popek project list REMOTE:``'s records (a token sees its own project only)."""
    data: list[dict[str, Any]] = client(remote).call("GET", "/1.0/projects")
    return data


def project(remote: str, name: str) -> dict[str, Any]:
    """``popek project show REMOTE:NAME``'s record."""
    data: dict[str, Any] = client(remote).call("GET", f"/1.0/projects/{quote(name, safe='')}")
    return data


def tokens(remote: str, project: str | None) -> list[dict[str, Any]]:
    """``popek token list REMOTE:``'s records (of ``project``), never a secret."""
    data: list[dict[str, Any]] = client(remote).call("GET", "/1.0/tokens",
                                                     params={"project": project})
    return data


def token_create(remote: str, body: dict[str, Any]) -> dict[str, Any]:
    """``popek token create REMOTE: ...``: the new token's record and its secret."""
    data: dict[str, Any] = client(remote).call("POST", "/1.0/tokens", json=body)
    return data


def token_revoke(remote: str, token_id: str) -> dict[str, Any]:
    """``popek token revoke REMOTE:ID``: the revoked token's record."""
    data: dict[str, Any] = client(remote).call(
        "POST", f"/1.0/tokens/{quote(token_id, safe='')}/revoke")
    return data
