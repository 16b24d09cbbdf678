"""Every key popek keeps in the state store, in one place.

The store is one flat, sorted key space (as etcd's).  Each owner of a
concern builds its keys only through the functions and prefixes here, so
that a reader sees the whole layout at once and no two concerns collide:

==================================  =============================================
``/popek/instances/P/NAME``         instance record (core)
``/popek/owners/P/NAME``            the popek process that owns an intent (core)
``/popek/uids/UID``                 host uid range allocated to an instance (core)
``/popek/uid-next/SIZE``            where the next search for a free range of SIZE starts
``/popek/active/P/NAME``            label and CPUs of an active instance (core's index)
``/popek/active-index``             set once the active index covers every record
``/popek/profiles/P/NAME``          profile: config keys and networks for launch (core)
``/popek/networks/NAME``            network record (network)
``/popek/ports/NET/IFNAME``         port record (network)
``/popek/leases/NET/IPV4``          IPv4 lease (network)
``/popek/macs/MAC``                 MAC reservation (network)
``/popek/netgen``                   generation of network create/delete (network)
``/popek/trust/keys/NAME``          trust key (trust)
``/popek/trust/verified/DIGEST``    signature already verified (trust)
``/popek/trust/serials/...``        highest image serial seen per signer (trust)
``/popek/trust/projects/P``         image trust settings of a project (trust)
``/popek/trust/binhash/...``        measured engine binaries (trust)
``/popek/policy/current``           the access control policy (trust)
``/popek/policy/version``           the highest policy version applied (trust)
``/popek/audit/head``               head of the audit chain (trust)
``/popek/audit/alarm``              set when the audit log was found tampered with
``/popek/projects/P/config``        a project's defaults and quotas (core.projects)
``/popek/tokens/ID``                API token: project, role, SHA-256 of its secret (core.auth)
``/popek/certificates/SHA256``      trusted TLS client certificate: project, role, PEM
                                    (core.certificates)
``/popek/operations/ID``            an operation of the REST API: status, result (core)
==================================  =============================================
"""

from __future__ import annotations

ROOT = "/popek/"

# -- instances (core) ------------------------------------------------------------
INSTANCES_PREFIX = "/popek/instances/"
OWNERS_PREFIX = "/popek/owners/"
UID_PREFIX = "/popek/uids/"
#: the slot after the last range handed out, per range size: a launch probes from there
#: (one or two reads) instead of reading every range the home holds
UID_NEXT_PREFIX = "/popek/uid-next/"
#: one small key per active instance (label, CPUs), written in the same transaction
#: as its record, so that a launch decides without reading every record
ACTIVE_PREFIX = "/popek/active/"
ACTIVE_INDEX_KEY = "/popek/active-index"
#: named sets of config keys and networks that ``launch -p`` applies (core.profiles)
PROFILES_PREFIX = "/popek/profiles/"

#: a project exists when it has this key (``default`` always exists)
PROJECTS_CONFIG_PREFIX = "/popek/projects/"
#: API tokens (core.auth): their record and the hash of their secret, never the secret
TOKENS_PREFIX = "/popek/tokens/"
#: TLS client certificates trusted for the API (core.certificates), by SHA-256 fingerprint
CERTIFICATES_PREFIX = "/popek/certificates/"

# -- networks ----------------------------------------------------------------------
NETWORKS_PREFIX = "/popek/networks/"
PORTS_PREFIX = "/popek/ports/"
LEASES_PREFIX = "/popek/leases/"
MACS_PREFIX = "/popek/macs/"
#: bumped by every network create/delete: guards subnet and bridge choices (CAS)
GENERATION_KEY = "/popek/netgen"

# -- trust -------------------------------------------------------------------------
TRUST_KEYS_PREFIX = "/popek/trust/keys/"
VERIFIED_PREFIX = "/popek/trust/verified/"
SERIALS_PREFIX = "/popek/trust/serials/"
PROJECTS_PREFIX = "/popek/trust/projects/"
BINHASH_PREFIX = "/popek/trust/binhash/"
POLICY_KEY = "/popek/policy/current"
POLICY_FLOOR_KEY = "/popek/policy/version"
AUDIT_HEAD_KEY = "/popek/audit/head"
AUDIT_ALARM_KEY = "/popek/audit/alarm"

# -- operations of the REST API (core.operations) -----------------------------------
OPERATIONS_PREFIX = "/popek/operations/"


def operation_key(op_id: str) -> str:
    """Return the store key of the API operation ``op_id``."""
    return f"{OPERATIONS_PREFIX}{op_id}"


def instance_key(project: str, name: str) -> str:
    """Return the store key of instance ``name`` in ``project``."""
    return f"{INSTANCES_PREFIX}{project}/{name}"


def instances_prefix(project: str | None = None) -> str:
    """Return the store prefix of every instance (of one project, if given)."""
    return f"{INSTANCES_PREFIX}{project}/" if project else INSTANCES_PREFIX


def owner_key(project: str, name: str) -> str:
    """Return the key naming the popek process that owns an intent on an instance."""
    return f"{OWNERS_PREFIX}{project}/{name}"


def active_key(project: str, name: str) -> str:
    """Return the key of an active instance's entry in the active index."""
    return f"{ACTIVE_PREFIX}{project}/{name}"


def profile_key(project: str, name: str) -> str:
    """Return the store key of profile ``name`` in ``project``."""
    return f"{PROFILES_PREFIX}{project}/{name}"


def profiles_prefix(project: str) -> str:
    """Return the store prefix of every profile of ``project``."""
    return f"{PROFILES_PREFIX}{project}/"


def project_config_key(project: str) -> str:
    """Return the store key of ``project``'s defaults and quotas."""
    return f"{PROJECTS_CONFIG_PREFIX}{project}/config"


def token_key(token_id: str) -> str:
    """Return the store key of API token ``token_id``."""
    return f"{TOKENS_PREFIX}{token_id}"


def certificate_key(fingerprint: str) -> str:
    """Return the store key of the client certificate of SHA-256 ``fingerprint`` (hex)."""
    return f"{CERTIFICATES_PREFIX}{fingerprint}"


def uid_key(uid: int) -> str:
    """Return the key that reserves the host uid range starting at ``uid``."""
    return f"{UID_PREFIX}{uid}"


def network_key(name: str) -> str:
    """Store key of network ``name``."""
    return f"{NETWORKS_PREFIX}{name}"


def port_key(network: str, host_ifname: str) -> str:
    """Store key of one port."""
    return f"{PORTS_PREFIX}{network}/{host_ifname}"


def lease_key(network: str, ipv4: str) -> str:
    """Store key of one IPv4 lease (value: the instance that holds it)."""
    return f"{LEASES_PREFIX}{network}/{ipv4}"


def mac_key(mac: str) -> str:
    """Store key that reserves one MAC address (value: the port key that uses it)."""
    return f"{MACS_PREFIX}{mac}"
