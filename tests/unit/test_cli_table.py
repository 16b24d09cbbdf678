"""Tables: boxed on a terminal, plain columns for scripts, fast for long lists."""

from __future__ import annotations

import io
import time

from popek.cli.table import print_table, render


def test_plain_columns_for_scripts_keep_every_character() -> None:
    out = io.StringIO()  # not a terminal
    reason = "the container's init exited unexpectedly (killed or crashed)"
    print_table(["NAME", "STATE", "REASON"], [["web", "stopped", reason], ["db-1", "running", ""]],
                out)
    lines = out.getvalue().splitlines()
    assert lines[0].split() == ["NAME", "STATE", "REASON"]
    assert lines[1].split(None, 2) == ["web", "stopped", reason]
    assert lines[2].split() == ["db-1", "running"]
    assert not set("┃│━─┏┓└┘") & set(out.getvalue())
    assert lines[1].index("stopped") == lines[0].index("STATE")  # aligned: cut -c works


def test_boxed_on_a_terminal() -> None:
    text = render(["NAME", "STATE"], [["web", "running"]], boxed=True)
    assert text.splitlines() == [
        "┏━━━━━━┳━━━━━━━━━┓",
        "┃ NAME ┃ STATE   ┃",
        "┡━━━━━━╇━━━━━━━━━┩",
        "│ web  │ running │",
        "└──────┴─────────┘",
    ]


def test_five_hundred_rows_take_milliseconds() -> None:
    rows = [[f"instance-{i}", "running", "container", "minimal", "1", "128MiB", ""]
            for i in range(500)]
    start = time.process_time()
    for boxed in (True, False):
        render(["NAME", "STATE", "ENGINE", "IMAGE", "VCPUS", "MEMORY", "REASON"], rows, boxed)
    assert time.process_time() - start < 0.25  # Rich took over a second of CPU here
