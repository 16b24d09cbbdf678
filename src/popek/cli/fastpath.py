"""The instance commands without Typer: a launch should not wait on a CLI framework.

Importing Typer and Click costs over 100 ms on this class of machine, more
than popek's whole own work in a launch.  For the instance verbs (launch,
start, stop, exec...) and ``sandbox run``, this module parses the command line against
:data:`popek.cli._fasttable.TABLE`, a description of the very same Typer
commands generated from them (``python -m popek.cli.fastgen``; a unit test
fails when it is stale), and runs the same functions of :mod:`popek.cli.ops`.

It parses a strict subset of what Click accepts: long and short options by
their exact names, ``--opt=value``, flags, positionals and ``--``.  Anything
else (``--help``, an unknown or combined option, a missing or malformed
value, a value outside its choices) returns ``None``, and the caller hands
the whole command line to Typer, which either parses it the same way or
prints its usual usage error.  A property test holds the two parsers equal
wherever this one answers.
"""

from __future__ import annotations

from typing import Any

from popek.cli._fasttable import TABLE

CONVERT: dict[str, type] = {"str": str, "int": int, "float": float}


def command(argv: list[str]) -> tuple[str, list[str]] | None:
    """Split ``argv`` into a command of :data:`TABLE` (one or two words) and its arguments."""
    for words in (2, 1):
        key = " ".join(argv[:words])
        if len(argv) >= words and key in TABLE:
            return key, argv[words:]
    return None


def parse(verb: str, args: list[str]) -> dict[str, Any] | None:
    """The parameters of ``popek VERB ARGS...`` as Typer would pass them, or ``None``."""
    spec = TABLE.get(verb)
    if spec is None:
        return None
    options = {o: p for p in spec["params"] if p["kind"] == "option" for o in p["opts"]}
    negations = {o: p for p in spec["params"] if p["kind"] == "option"
                 for o in p["secondary"]}
    values: dict[str, Any] = {}
    positional: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg == "--":
            positional.extend(args[i:])
            break
        if not arg.startswith("-") or arg == "-":
            positional.append(arg)
            continue
        key, eq, inline = arg.partition("=")
        if eq and not key.startswith("--"):
            return None  # Click reads -n=1 as the cluster -n -= -1: leave it to Click
        param = options.get(key) or negations.get(key)
        if param is None:
            return None
        if param["flag"]:
            if eq:
                return None
            value: Any = key in param["opts"]
        else:
            if not eq:
                if i >= len(args):
                    return None
                inline = args[i]
                i += 1
            value = _convert(param, inline)
            if value is None:
                return None
        if param["multiple"]:
            values.setdefault(param["name"], []).append(value)
        else:
            values[param["name"]] = value
    return _complete(spec["params"], values, positional)


def _convert(param: dict[str, Any], text: str) -> Any:
    convert = CONVERT.get(param["type"])
    if convert is None:  # a boolean that is not a flag: Click's spellings are many
        return None
    try:
        value = convert(text)
    except ValueError:
        return None
    if param.get("choices") and value not in param["choices"]:
        return None
    return value


def _complete(params: list[dict[str, Any]], values: dict[str, Any],
              positional: list[str]) -> dict[str, Any] | None:
    """Give the positionals to the arguments, defaults to the rest; ``None`` if they don't fit."""
    for p in params:
        if p["kind"] == "argument":
            if p["nargs"] == -1:
                taken, positional = positional, []
                if not taken and p["required"]:
                    return None
                values[p["name"]] = [_convert(p, t) for t in taken]
                if None in values[p["name"]]:
                    return None
                continue
            if not positional:
                if p["required"]:
                    return None
                values[p["name"]] = None  # an optional argument not given (list's [REMOTE:])
                continue
            values[p["name"]] = _convert(p, positional.pop(0))
            if values[p["name"]] is None:
                return None
        elif p["name"] not in values:
            if p["required"]:
                return None
            values[p["name"]] = list(p["default"]) if p["multiple"] else p["default"]
    return None if positional else values
