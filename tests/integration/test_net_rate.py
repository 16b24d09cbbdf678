"""Network rate limits on request (``--net-rate``, ``limits.net``): tc on the host side.

A receiver container fetches a few MiB over HTTP from a sender on the same
network; the sender's measured upload must stay near its limit, rise when
the limit is lifted, and follow a limit changed live.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from framework import popek, popek_json

NET = "ratenet"
SENDER, RECEIVER = "rate-tx", "rate-rx"
MIB = 6


@pytest.fixture(scope="module")
def pair(minimal_image: str) -> Iterator[None]:
    popek("network", "create", NET)
    popek("launch", minimal_image, RECEIVER, "--container", "--memory", "64MiB",
          "--network", NET)
    popek("launch", minimal_image, SENDER, "--container", "--memory", "64MiB",
          "--network", NET, "--net-rate", "16Mbit")
    # the sender serves a file (busybox httpd): what it uploads is what its limit caps
    popek("exec", SENDER, "--", "sh", "-c",
          f"mkdir -p /www && dd if=/dev/zero of=/www/blob bs=64k count={MIB * 16} 2>/dev/null"
          " && httpd -p 8080 -h /www")
    yield
    for name in (SENDER, RECEIVER):
        popek("delete", "--force", name, check=False)
    popek("network", "delete", "--force", NET, check=False)


def _send_rate() -> float:
    """Bits per second of one HTTP transfer of MIB MiB from the sender to the receiver.

    Timed by the receiver, from its request to the last byte it got.
    """
    sender_ip = popek_json("info", SENDER)["ports"][0]["ipv4"]
    out = popek("exec", RECEIVER, "--", "sh", "-c",
                "a=$(cut -d' ' -f1 /proc/uptime); "
                f"n=$(wget -q -O - http://{sender_ip}:8080/blob | wc -c); "
                "b=$(cut -d' ' -f1 /proc/uptime); echo \"$n $a $b\"", timeout=120).stdout.split()
    got, a, b = int(out[0]), float(out[1]), float(out[2])
    assert got == MIB << 20, f"received {got} bytes"
    return got * 8 / max(b - a, 0.01)


def test_rate_follows_the_limit(pair: None) -> None:
    limited = _send_rate()
    assert limited <= 16e6 * 1.3, f"{limited / 1e6:.1f} Mbit/s over a 16 Mbit/s limit"
    assert limited >= 16e6 * 0.3, f"only {limited / 1e6:.1f} Mbit/s under a 16 Mbit/s limit"
    cfg = json.loads(popek("config", "show", SENDER, "--format", "json").stdout)
    assert cfg["limits.net"] == "16Mbit"

    popek("config", "set", SENDER, "limits.net", "none")  # live
    free = _send_rate()
    assert free > 3 * limited, f"lifting the limit: {free / 1e6:.1f} Mbit/s"

    popek("config", "set", SENDER, "limits.net", "8Mbit")  # live again, lower
    again = _send_rate()
    assert again <= 8e6 * 1.3, f"{again / 1e6:.1f} Mbit/s over an 8 Mbit/s limit"


@pytest.mark.parametrize("rate", ["fast", "10", "0.5Mbit", "500Gbit"])
def test_bad_rate_is_refused(minimal_image: str, rate: str) -> None:
    proc = popek("launch", minimal_image, "badrate", "--container", "--net-rate", rate,
                 check=False)
    assert proc.returncode == 2 and "rate" in proc.stderr, proc.stderr
    assert "badrate" not in [e["name"] for e in popek_json("list")]
