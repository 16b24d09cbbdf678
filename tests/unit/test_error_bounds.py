"""Nothing internal reaches the user: any size, rate or limit text is a value or one bounded line.

Property tests feed the parsers (``units.parse_size``, ``shaping.parse_rate``,
``config.apply`` for every key) any text, thousands of digits included: the
answer is a number or a :class:`PopekError` whose message is at most
``errors.MAX_MESSAGE`` characters, never ``ValueError`` or ``OverflowError``.
The CLI is run on the inputs the review used (a 5000-digit size, a 100 KB value).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from popek.core import config
from popek.core.lifecycle import State
from popek.core.model import Instance, InstanceSpec
from popek.errors import MAX_MESSAGE, ImageError, InvalidInput, PopekError, bounded
from popek.images.process import Process
from popek.network.shaping import RATE_RULE, parse_rate
from popek.units import parse_size

#: what a user may type: any text, and numbers far past 4300 digits (Python's int() limit)
numbers = st.integers(min_value=0, max_value=6000).map(lambda n: "7" * n)
units = st.sampled_from(["", "B", "KiB", "MiB", "GiB", "TiB", "KB", "GB", "kbit", "Mbit",
                         "gbit", ".5Mbit", "e9", "x"])
texts = st.one_of(st.text(max_size=50), st.builds(lambda n, u: n + u, numbers, units),
                  st.builds(lambda n, u: f" {n}.{n} {u} ", numbers, units))


def _bounded_error(call: object, *args: object) -> object:
    try:
        return call(*args)  # type: ignore[operator]
    except PopekError as exc:
        assert len(str(exc)) <= MAX_MESSAGE, len(str(exc))
        assert "\n" not in str(exc) or "\n" in "".join(map(str, args))
        return exc


@settings(max_examples=300, deadline=None)
@given(texts)
def test_any_size_text_is_a_size_or_one_bounded_error(text: str) -> None:
    out = _bounded_error(parse_size, text, "limits.memory")
    assert isinstance(out, InvalidInput) or (isinstance(out, int) and out >= 0)


@settings(max_examples=300, deadline=None)
@given(texts)
def test_any_rate_text_is_a_rate_in_range_or_one_bounded_error(text: str) -> None:
    out = _bounded_error(parse_rate, text)
    assert isinstance(out, InvalidInput) or (isinstance(out, int)
                                             and 1_000_000 <= out <= 100_000_000_000)


def _instance() -> Instance:
    return Instance("web", InstanceSpec(image="minimal", engine="container", memory=64 << 20),
                    State.STOPPED, 1000, "now")


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(["limits.memory", "limits.cpu", "limits.pids", "limits.net", "label"]),
       texts)
def test_any_config_value_is_applied_or_refused_in_one_bounded_line(key: str, text: str) -> None:
    out = _bounded_error(config.apply, _instance(), key, text)
    assert isinstance(out, PopekError | config.Live)


@pytest.mark.parametrize("value", ["0", " 0", "0bit", "0Mbit", "0.0kbit"])
def test_limits_net_zero_is_refused_as_the_range_says(value: str) -> None:
    inst = _instance()
    with pytest.raises(InvalidInput) as exc:
        config.apply(inst, "limits.net", value)
    assert RATE_RULE in str(exc.value) and "none to lift the limit" in str(exc.value)
    assert "net" not in inst.spec.limits


def test_none_still_lifts_the_limit() -> None:
    inst = _instance()
    config.apply(inst, "limits.net", "100Mbit")
    assert inst.spec.limits["net"] == 100_000_000
    config.apply(inst, "limits.net", "none")
    assert "net" not in inst.spec.limits


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=5000), st.integers(min_value=0, max_value=3000))
def test_bounded_keeps_both_ends_and_the_limit(text: str, limit: int) -> None:
    out = bounded(text, limit)
    if len(text) <= max(limit, 100):  # a limit is at least 100: a shorter text stays whole
        assert out == text
    else:
        assert len(out) <= max(limit, 100)
        assert "characters left out]" in out
        assert text.startswith(out[:out.index(" ...[")])
        assert text.endswith(out[out.index("]... ") + len("]... "):])


def test_a_100kb_image_environment_value_is_not_echoed_whole() -> None:
    value = "A" * 100_000
    with pytest.raises(ImageError) as exc:
        Process(env=(f"HUGE={value}",))
    message = str(exc.value)
    assert len(message) <= MAX_MESSAGE
    assert message.startswith("process 'env' item 'HUGE=AAA")
    assert message.endswith("must be a string without NUL, at most 65536 characters")


def _cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "POPEK_HOME": str(tmp_path / "home"), "POPEK_CLI_SERVER": "off"}
    return subprocess.run([sys.executable, "-m", "popek", *args], capture_output=True,
                          text=True, env=env, stdin=subprocess.DEVNULL, timeout=120, check=False)


@pytest.mark.parametrize("args", [
    ("launch", "minimal", "x", "--memory", "1" * 5000 + "MiB"),
    ("launch", "minimal", "x", "--vcpus", "1" * 5000),
    ("launch", "minimal", "x", "--net-rate", "1" * 5000 + "Mbit", "--container"),
    ("network", "create", "h3n", "--subnet", "10.99.0.0/" + "1" * 5000),
    ("config", "set", "x" * 100_000, "limits.net", "0"),
])
def test_the_cli_answers_huge_input_with_a_short_error(tmp_path: Path, args: tuple[str, ...]
                                                       ) -> None:
    out = _cli(tmp_path, *args)
    assert out.returncode in (1, 2), (out.returncode, out.stderr[:2000])  # not 70: a bug
    assert len(out.stderr) < 2 * MAX_MESSAGE, len(out.stderr)
    assert "failed inside" not in out.stderr and "Traceback" not in out.stderr


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-10**30, 10**30)))
def test_any_timeout_is_seconds_in_range_or_one_bounded_error(value: float) -> None:
    from popek.core.requests import Exec, Launch, Stop
    from popek.core.service import MAX_TIMEOUT

    for build in (lambda: Stop("web", timeout=value),
                  lambda: Exec("web", argv=("true",), timeout=value),
                  lambda: Launch("minimal", "web", ready_timeout=value)):
        out = _bounded_error(build)
        ok = isinstance(value, int | float) and 0 <= value <= MAX_TIMEOUT
        assert isinstance(out, InvalidInput) != ok, (value, out)


@pytest.mark.parametrize("args", [
    ("stop", "x", "--timeout", "inf"),
    ("stop", "x", "--timeout", "nan"),
    ("exec", "x", "--timeout", "1e999", "--", "true"),
    ("launch", "minimal", "x", "--timeout", "inf"),
])
def test_an_infinite_or_nan_timeout_is_refused_at_the_boundary(tmp_path: Path,
                                                               args: tuple[str, ...]) -> None:
    out = _cli(tmp_path, *args)
    assert out.returncode == 2, out.stderr
    assert out.stderr.splitlines()[-1].startswith("Error: invalid timeout ")
    assert "Traceback" not in out.stderr and "OverflowError" not in out.stderr


def test_a_text_under_the_floor_of_100_stays_whole() -> None:
    """Below 100 characters nothing is cut, whatever the limit asked (it cut 99 characters
    to the same length with '-32 characters left out' in their middle)."""
    assert bounded("x" * 99, 5) == "x" * 99
