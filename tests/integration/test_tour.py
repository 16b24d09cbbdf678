"""The README's tour runs as written (issue 13.7).

The commands come from README.md itself: every ```sh block that follows a line
``<!-- tour ... -->``, read as a shell reads it (a ``\\`` at the end of a line
continues it, a here-document runs to its delimiter).  They run in order, each
in its own ``bash -c``, in one working directory, with a private POPEK_HOME
and a private HOME of mode 0700, as root's is.  Each must exit 0, and where
its comment says ``prints "TEXT"`` its output (stdout and stderr) must
contain TEXT.  Nothing of the tour is copied here.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from framework import REPO

MARK = "<!-- tour"
PRINTS = re.compile(r'prints "([^"]+)"')
HEREDOC = re.compile(r"<<-?\s*'?\"?(\w+)'?\"?")


@dataclass(frozen=True)
class Step:
    """One command of the tour: its text, what it must print, its README line."""

    command: str
    prints: tuple[str, ...]
    line: int


def tour_blocks(readme: str) -> list[list[tuple[int, str]]]:
    """The lines (with their numbers) of each ```sh block marked as the tour."""
    blocks: list[list[tuple[int, str]]] = []
    lines = readme.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].startswith(MARK):
            j = i + 1
            while j < len(lines) and not lines[j].startswith("```"):
                j += 1
            if j == len(lines) or lines[j].strip() not in ("```sh", "```bash"):
                raise AssertionError(f"README.md:{i + 1}: a tour mark not followed by a "
                                     "```sh block")
            k = j + 1
            block = []
            while k < len(lines) and not lines[k].startswith("```"):
                block.append((k + 1, lines[k]))
                k += 1
            blocks.append(block)
            i = k
        i += 1
    return blocks


def steps(readme: str) -> list[Step]:
    """The tour's commands, as a shell would split them into logical lines."""
    out: list[Step] = []
    for block in tour_blocks(readme):
        it = iter(block)
        for number, text in it:
            if not text.strip() or text.lstrip().startswith("#"):
                continue
            command = text
            while command.endswith("\\"):
                command = command[:-1] + "\n" + next(it)[1]
            doc = HEREDOC.search(command)
            if doc:
                for _, more in it:
                    command += "\n" + more
                    if more.strip() == doc.group(1):
                        break
            out.append(Step(command, tuple(PRINTS.findall(command.split("\n")[0])), number))
    return out


def test_the_tour_is_found_and_parsed() -> None:
    """No tour, no test: the mark must be there and hold commands."""
    found = steps((REPO / "README.md").read_text())
    assert len(found) >= 10, found
    assert all(s.command.lstrip().startswith(("popek", "mkdir", "cat", "openssl", "printf"))
               for s in found), [s.command for s in found]


def test_readme_tour_runs_as_written() -> None:
    if os.geteuid() != 0:
        pytest.skip("integration tests need root")
    found = steps((REPO / "README.md").read_text())
    base = Path(tempfile.mkdtemp(prefix="popek-htour-", dir="/var/tmp"))
    base.chmod(0o755)
    home, user, work = base / "home", base / "user", base / "cwd"
    for d in (home, user, work):
        d.mkdir()
    home.chmod(0o755)
    user.chmod(0o700)  # as root's home is: the sandbox's nobody cannot search it
    env = {**os.environ, "POPEK_HOME": str(home), "HOME": str(user),
           "PATH": f"{REPO / '.venv' / 'bin'}:{os.environ.get('PATH', '/usr/bin:/bin')}",
           "POPEK_CACHE": os.environ.get("POPEK_CACHE", str(REPO / ".cache" / "popek")),
           # the code of this checkout, not a warm command server started before an edit
           "POPEK_CLI_SERVER": "off"}
    try:
        for step in found:
            done = subprocess.run(["bash", "-c", step.command], cwd=work, env=env,
                                  stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                  timeout=600, check=False)
            said = done.stdout + done.stderr
            where = f"README.md:{step.line}: {step.command!r}"
            assert done.returncode == 0, f"{where} exited {done.returncode}:\n{said}"
            for text in step.prints:
                assert text in said, f"{where} did not print {text!r}:\n{said}"
    finally:
        subprocess.run(["popek", "admin", "reset", "--purge", "--yes"], env=env,
                       capture_output=True, timeout=300, check=False)
        shutil.rmtree(base, ignore_errors=True)
