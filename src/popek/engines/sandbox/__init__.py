"""Application sandboxes on bubblewrap: one application, a minimal view of the host.

``run(profile_name, options, cmd)`` is the whole use; profiles are TOML files
(see ``docs/SANDBOX.md``) under ``$POPEK_HOME/profiles``.

Not an instance engine: a sandbox has no record, no lifecycle, no network
port and no state to reconcile; it is a foreground process whose stdio and
exit code are its caller's.  So it does not implement
:class:`popek.engines.Engine` (whose every method is about a recorded
instance) and is not returned by :func:`popek.engines.get_engine`; it is a
service of its own, reached through one request,
:class:`popek.core.requests.SandboxRun`, which core audits like any other.
"""

from __future__ import annotations

from popek.engines.sandbox.argv import Fds, build_bwrap_argv, prlimit_argv
from popek.engines.sandbox.profile import (
    Limits,
    Profile,
    RunOptions,
    check_bind_path,
    merge,
    parse_profile,
)
from popek.engines.sandbox.runner import find_tools, run
from popek.engines.sandbox.store import install_shipped, load, names, profiles_dir

__all__ = ["Fds", "Limits", "Profile", "RunOptions", "build_bwrap_argv", "check_bind_path",
           "find_tools", "install_shipped", "load", "merge", "names", "parse_profile",
           "prlimit_argv", "profiles_dir", "run"]
