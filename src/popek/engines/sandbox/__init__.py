"""Application sandboxes on bubblewrap: one application, a minimal view of the host.

``run(profile_name, options, cmd)`` is the whole use; profiles are TOML files
(see ``docs/SANDBOX.md``) under ``$POPEK_HOME/profiles``.
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
