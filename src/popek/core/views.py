"""The records that list and show commands print, for every front end.

``popek image list --format json`` and ``GET /1.0/images`` give the same
objects: both build them here, from the same services.  Instances have
theirs on :class:`popek.core.instances.Instances` (``summaries``, ``info``).
Each function only reads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from popek.names import DEFAULT_PROJECT

if TYPE_CHECKING:
    from popek.core.service import Core
    from popek.images import Image
    from popek.trust.keys import TrustStore


def signature_summary(path: Path) -> dict[str, Any] | None:
    """Who signed an image, as its manifest.sig says (checked at each start, not here)."""
    try:
        st = json.loads((path / "manifest.sig").read_text())["statement"]
        return {"signer": str(st["signer"]), "serial": int(st["serial"]),
                "expires": str(st["expires"])}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def image_summary(image: Image, project: str = DEFAULT_PROJECT) -> dict[str, Any]:
    """One row of ``popek image list`` (``project``: the project the image belongs to)."""
    return {"name": image.name, "project": project, "version": image.manifest.version,
            "created": image.manifest.created, "kernel": image.manifest.kernel_version,
            "kinds": image.kinds(), "size": sum(f.size for f in image.manifest.files.values()),
            "signature": signature_summary(image.path)}


def image_summaries(core: Core) -> list[dict[str, Any]]:
    """The rows of ``popek image list``: the images of the core's project, then the
    ``default`` project's (shared read-only with every project)."""
    return [image_summary(image, project) for project, image in core.images.visible(core.project)]


def image_detail(image: Image, project: str = DEFAULT_PROJECT) -> dict[str, Any]:
    """``popek image info``: the manifest, the image's project and who signed it."""
    data: dict[str, Any] = json.loads(image.manifest.to_json())
    data["project"] = project
    data["signature"] = signature_summary(image.path)
    return data


def _sees(core: Core, instance: str) -> bool:
    """Whether the core's identity may see a port of ``instance`` (``PROJECT/NAME``): the host
    admin sees all; anyone else only its own project's, on a network shared or not."""
    return core.identity.host_admin or instance.startswith(f"{core.project}/")


def network_summaries(core: Core) -> list[dict[str, Any]]:
    """The rows of ``popek network list``: the networks of the core's project, then the
    ``default`` project's (shared), each with how many of the ports it may see it has."""
    svc = core.networks
    counts: dict[str, int] = {}
    for port in svc.ports():
        if _sees(core, port.instance):
            counts[port.network] = counts.get(port.network, 0) + 1
    return [{"name": n.short, "project": n.project, "subnet": n.subnet, "gateway": n.gateway,
             "bridge": n.bridge, "nat": n.nat, "port_isolation": n.port_isolation,
             "state": n.state, "ports": counts.get(n.name, 0)}
            for n in svc.visible(core.project)]


def network_detail(core: Core, name: str) -> dict[str, Any]:
    """``popek network info NAME``: network ``name`` as the core's project names it (its own,
    else ``default``'s), with the ports and leases its identity may see."""
    svc = core.networks
    data: dict[str, Any] = svc.info(svc.resolve(name, core.project).name)
    if core.identity.host_admin:
        return data
    ports = [p for p in data["ports"] if _sees(core, p["instance"])]
    macs = {p["mac"] for p in ports}
    data["ports"] = ports
    data["leases"] = {ip: who for ip, who in data["leases"].items() if _sees(core, who)}
    ifnames = {p["host_ifname"] for p in ports}
    if "dhcp_leases" in data:
        data["dhcp_leases"] = [d for d in data["dhcp_leases"] if d.get("mac") in macs]
    if isinstance(data.get("devices"), dict):
        data["devices"] = {k: v for k, v in data["devices"].items() if k in ifnames}
    bridge = data.get("bridge")
    if isinstance(bridge, dict) and "ports" in bridge:
        data["bridge"] = {**bridge, "ports": [n for n in bridge["ports"] if n in ifnames]}
    return data


def profiles_used(core: Core) -> dict[str, list[str]]:
    """For each profile, the instances launched with it."""
    out: dict[str, list[str]] = {}
    for inst in core.instances.all():
        for p in inst.spec.profiles:
            out.setdefault(p, []).append(inst.name)
    return out


def profile_summaries(core: Core) -> list[dict[str, Any]]:
    """The rows of ``popek profile list``."""
    from popek.core.profiles import Profiles

    used = profiles_used(core)
    return [{**p.to_doc(), "used_by": used.get(p.name, [])}
            for p in Profiles(core.store, core.project).all()]


def policy_detail(trust: TrustStore) -> dict[str, Any]:
    """``popek policy show --format json``: the policy in force, its version and signer."""
    from popek.trust.policy import DEFAULT_POLICY, PolicyStore, check_signed

    info = PolicyStore(trust).info()
    pol = check_signed(trust)
    return {**info, "mode": pol.mode, "labels": sorted(pol.labels),
            "conflicts": [{"name": name, "labels": sorted(ls)} for name, ls in pol.conflicts],
            "shares": [{"kind": kind, "labels": sorted(ls)} for kind, ls in pol.shares],
            "text": pol.text if info["applied"] else DEFAULT_POLICY}


def audit_records(trust: TrustStore, since: str = "", target: str = "",
                  option: str = "since") -> list[dict[str, Any]]:
    """The records of ``popek audit log``: at or after ``since`` (ISO time), about ``target``.

    ``option`` names ``since`` in the error when it is not a time (``--since`` on the CLI).
    """
    from popek.trust.audit import AuditLog
    from popek.trust.keys import parse_time

    after = parse_time(since, option) if since else None
    return [r for r in AuditLog(trust).records()
            if (not target or r.get("target") == target)
            and (after is None or parse_time(str(r.get("time")), "time") >= after)]


def project_summaries(core: Core, current: str | None,
                      only: str | None = None) -> list[dict[str, Any]]:
    """The rows of ``popek project list``: each project (``only``: that one), whether it
    is ``current``, and how many instances it holds."""
    from popek.core.projects import Projects

    counts: dict[str, int] = {}
    for inst in core.instances.all(None):
        counts[inst.project] = counts.get(inst.project, 0) + 1
    return [{"name": p, "current": p == current, "instances": counts.get(p, 0)}
            for p in Projects(core.store).names() if only is None or p == only]


def project_detail(core: Core, name: str) -> dict[str, Any]:
    """``popek project show NAME --format json``: its defaults, quotas and their use
    (NotFound for a project that does not exist)."""
    from popek.core.projects import Projects, usage

    project = Projects(core.store).require(name)
    return {"name": project,
            **Projects(core.store).show(project, usage(core.instances.all(project)))}


def token_summaries(core: Core, project: str | None = None) -> list[dict[str, Any]]:
    """The rows of ``popek token list`` (of ``project``): every field but the hash."""
    from popek.core.auth import Tokens

    return [t.public() for t in Tokens(core.store).list(project)]


def sandbox_profiles() -> list[dict[str, Any]]:
    """The rows of ``popek sandbox profiles`` (installs the shipped ones on first use); a
    profile that does not load is listed with its error."""
    from popek.engines.sandbox import load, names, profiles_dir
    from popek.errors import PopekError

    rows: list[dict[str, Any]] = []
    for name in names():
        path = profiles_dir() / f"{name}.toml"
        try:
            p = load(name)
        except PopekError as exc:
            rows.append({"name": name, "path": str(path), "error": str(exc)})
            continue
        rows.append({"name": name, "path": str(path), "network": p.network,
                     "ro": [str(x) for x in p.ro], "rw": [str(x) for x in p.rw],
                     "memory": p.limits.memory, "nproc": p.limits.nproc,
                     "nofile": p.limits.nofile, "cpu_seconds": p.limits.cpu_seconds,
                     "seccomp_extra": list(p.seccomp_extra)})
    return rows
