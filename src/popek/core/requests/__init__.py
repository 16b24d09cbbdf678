"""Every request popek handles, by domain; run them with :meth:`popek.core.service.Core.handle`."""

from popek.core.requests.certificates import CertificateAdd, CertificateRevoke
from popek.core.requests.images import Built, ImageBuild, ImageDelete, ImageImport, ImageSign
from popek.core.requests.instances import (
    Attach,
    Attest,
    ConfigSet,
    ConfigUnset,
    Console,
    Delete,
    Detach,
    Exec,
    Launch,
    Pause,
    ProjectSet,
    Restart,
    Resume,
    Start,
    Stop,
)
from popek.core.requests.networks import NetworkCreate, NetworkDelete
from popek.core.requests.profiles import ProfileCreate, ProfileDelete, ProfileEdit
from popek.core.requests.projects import ProjectCreate, ProjectDelete, TokenCreate, TokenRevoke
from popek.core.requests.sandbox import SandboxCapture, SandboxRun
from popek.core.requests.storage import (
    PoolCreate,
    PoolDelete,
    VolumeAttach,
    VolumeClone,
    VolumeCreate,
    VolumeDelete,
    VolumeDetach,
    VolumeExport,
    VolumeImport,
    VolumeResize,
    VolumeRestore,
    VolumeSet,
    VolumeSnapshot,
    VolumeSnapshotDelete,
)
from popek.core.requests.trust import (
    AllowUnsigned,
    AuditCheckpoint,
    KeyAdd,
    KeyGen,
    KeyRemove,
    KeyRevoke,
    PolicyApply,
)

__all__ = ["AllowUnsigned", "Attach", "Attest", "AuditCheckpoint", "Built", "CertificateAdd",
           "CertificateRevoke", "ConfigSet",
           "ConfigUnset", "Console", "Delete", "Detach", "Exec", "ImageBuild", "ImageDelete",
           "ImageImport", "ImageSign", "KeyAdd", "KeyGen", "KeyRemove", "KeyRevoke", "Launch",
           "NetworkCreate", "NetworkDelete", "Pause", "PolicyApply", "PoolCreate", "PoolDelete",
           "ProfileCreate",
           "ProfileDelete", "ProfileEdit", "ProjectCreate", "ProjectDelete", "ProjectSet",
           "Restart", "Resume", "SandboxCapture", "SandboxRun", "Start", "Stop", "TokenCreate",
           "TokenRevoke", "VolumeAttach", "VolumeClone", "VolumeCreate", "VolumeDelete",
           "VolumeDetach", "VolumeExport",
           "VolumeImport", "VolumeResize",
           "VolumeRestore", "VolumeSet", "VolumeSnapshot", "VolumeSnapshotDelete"]
