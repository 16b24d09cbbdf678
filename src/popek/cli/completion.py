"""Shell completion of ``popek`` for bash, zsh and fish.

``popek completion SHELL`` prints a script that registers completion for the
command ``popek`` (whatever started the interpreter: the native client's
fallback runs ``python -c``, the command server ``python -m ...``; the name
is :data:`popek.cli.entry.PROG_NAME`).  The script calls ``popek`` back with
``_POPEK_COMPLETE=complete_SHELL`` and the words typed so far; Click and
Typer's completion classes answer with the sub-commands and options, and
:func:`attach` adds the names of instances and images where a command takes
one.  ``make setup`` installs the scripts where each shell's completion
directory exists (:data:`INSTALL_DIRS`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import click

from popek.cli.client import COMPLETE_VAR

__all__ = ["COMPLETE_VAR", "SHELLS", "attach", "prepare", "script"]
SHELLS = ("bash", "zsh", "fish")
SHELL_CHOICE = click.Choice(SHELLS)
#: where ``make setup`` installs each script (when the directory exists), and its file name
INSTALL_DIRS = {
    "bash": ("/usr/share/bash-completion/completions", "popek"),
    "zsh": ("/usr/share/zsh/vendor-completions", "_popek"),
    "fish": ("/usr/share/fish/vendor_completions.d", "popek.fish"),
}

#: the arguments that name an existing instance: command path -> argument name
#: (a path ending in ``*``: every sub-command of that group)
INSTANCE_ARGUMENTS = {
    "info": "name", "start": "name", "stop": "name", "restart": "name", "pause": "name",
    "resume": "name", "console": "name", "exec": "name", "delete": "name", "attest": "name",
    "config *": "name", "network attach": "instance", "network detach": "instance",
}
#: the arguments that name an existing image
IMAGE_ARGUMENTS = {
    "launch": "image", "image info": "name", "image delete": "name", "image sign": "image",
}

_BASH = """\
_popek_completion() {
    local IFS=$'\\n'
    COMPREPLY=( $( env COMP_WORDS="${COMP_WORDS[*]}" COMP_CWORD=$COMP_CWORD \\
                   _POPEK_COMPLETE=complete_bash "$1" 2>/dev/null ) )
    return 0
}

complete -o default -F _popek_completion popek
"""

# Sourced (`source <(popek completion zsh)`) it registers the function with compdef;
# autoloaded from the fpath (vendor-completions/_popek) it is the completion function.
_ZSH = """\
#compdef popek

_popek_completion() {
  eval "$(env _TYPER_COMPLETE_ARGS="${words[1,$CURRENT]}" _POPEK_COMPLETE=complete_zsh \\
          popek 2>/dev/null)"
}

if [[ "${zsh_eval_context[-1]}" == loadautofunc ]]; then
  _popek_completion "$@"
else
  compdef _popek_completion popek
fi
"""

_FISH = """\
function __popek_complete
    env _POPEK_COMPLETE=complete_fish _TYPER_COMPLETE_FISH_ACTION=$argv[1] \\
        _TYPER_COMPLETE_ARGS=(commandline -cp) popek 2>/dev/null
end
complete --command popek --no-files --arguments "(__popek_complete get-args)" \\
    --condition "__popek_complete is-args"
"""

SCRIPTS = {"bash": _BASH, "zsh": _ZSH, "fish": _FISH}


def script(shell: str) -> str:
    """The completion script of ``shell`` (bash, zsh or fish) for the command ``popek``."""
    return SCRIPTS[shell]


def requested() -> bool:
    """Whether this process answers a completion request (it must print nothing else)."""
    return bool(os.environ.get(COMPLETE_VAR))


def instance_names() -> list[str]:
    """The instances of this host (``POPEK_HOME``), or none when the store cannot be read.

    Reads the records only: no reconcile, and no store is made where there is none.
    """
    from popek import paths

    if not paths.state_db().exists():
        return []
    try:
        from popek.cli import scope
        from popek.core.records import Records
        from popek.state import open_store

        return [i.name for i in Records(open_store(), scope.current()).all()]
    except Exception:  # completion offers nothing rather than fail
        return []


def image_names() -> list[str]:
    """The images the current project names (:func:`popek.cli.scope.current`): its own, then
    ``default``'s, which every project shares; by their directory names (nothing is read
    or checked)."""
    from popek.cli import scope
    from popek.images.store import ImageStore
    from popek.names import DEFAULT_PROJECT

    try:
        store, project = ImageStore(), scope.current()
        names = store.in_project(project).names()
        if project != DEFAULT_PROJECT:
            names += store.in_project(DEFAULT_PROJECT).names()
        return list(dict.fromkeys(names))
    except Exception:  # completion offers nothing rather than fail
        return []


class Completing(click.ParamType[Any]):
    """The type of an argument that names an existing object: the original type's
    conversion, and the names there are as its completions."""

    def __init__(self, inner: click.ParamType[Any], names: Callable[[], list[str]]) -> None:
        self.inner, self.names = inner, names
        self.name = inner.name

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None
                ) -> Any:
        """As the argument's own type."""
        return self.inner.convert(value, param, ctx)

    def shell_complete(self, ctx: click.Context, param: click.Parameter, incomplete: str
                       ) -> list[click.shell_completion.CompletionItem]:
        """The names that start with what was typed."""
        from click.shell_completion import CompletionItem

        return [CompletionItem(n) for n in self.names() if n.startswith(incomplete)]


def attach(root: click.Command) -> None:
    """Let the arguments of :data:`INSTANCE_ARGUMENTS` and :data:`IMAGE_ARGUMENTS` complete
    the names there are (a command missing from the tree is left alone)."""
    for table, names in ((INSTANCE_ARGUMENTS, instance_names), (IMAGE_ARGUMENTS, image_names)):
        for path, argument in table.items():
            for cmd in _commands(root, path.split()):
                for param in cmd.params:
                    if isinstance(param, click.Argument) and param.name == argument:
                        param.type = Completing(param.type, names)


def _commands(root: click.Command, path: list[str]) -> list[click.Command]:
    """The commands at ``path`` under ``root`` (``*``: every sub-command of the group)."""
    found = [root]
    for word in path:
        groups = [c for c in found if isinstance(c, click.Group)]
        found = ([c for g in groups for c in g.commands.values()] if word == "*" else
                 [g.commands[word] for g in groups if word in g.commands])
    return found


def prepare(root: click.Command) -> None:
    """Ready ``root`` to answer a completion request, when this process serves one:
    Typer's answers for bash, zsh and fish registered with Click, and :func:`attach`."""
    if not requested():
        return
    from typer._completion_classes import completion_init

    completion_init()
    attach(root)


def install(dirs: dict[str, tuple[str, str]] | None = None) -> list[str]:
    """Write each shell's script into its completion directory, where that directory exists.

    Returns the files written (``make setup`` runs this; removing them is the
    uninstaller's, see docs/ARCHITECTURE.md).
    """
    written = []
    for shell, (where, name) in (INSTALL_DIRS if dirs is None else dirs).items():
        if os.path.isdir(where):
            path = os.path.join(where, name)
            tmp = f"{path}.tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(script(shell))
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
            written.append(path)
    return written


if __name__ == "__main__":  # make setup: python -m popek.cli.completion
    for path in install():
        print(f"setup: shell completion in {path}")
