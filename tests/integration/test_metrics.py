"""Metrics (issue 14.6): Debian's Prometheus scrapes ``popek serve``'s /metrics for real.

A container runs in the session's private POPEK_HOME; ``popek serve`` listens
on a private socket and on a free TCP port of 127.0.0.1 (TLS, a viewer
token of the default project); a real ``prometheus`` with a generated
configuration (its own data directory, 127.0.0.1 on another free port)
scrapes it every second.  A PromQL query through Prometheus's HTTP API then
returns the container's memory, non-zero and close to what its cgroup says.
Every wait polls with a deadline.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from framework import container_cgroup, free_port, popek, wait_for
from framework.events import read_line

CT = "hmet-ct"
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"


@dataclass
class Stack:
    """popek serve, Prometheus scraping it, and where each listens."""

    serve: subprocess.Popen[str]
    sock: Path
    api_port: int
    prometheus: subprocess.Popen[bytes]
    prom_port: int
    prom_log: Path

    def query(self, promql: str) -> list[dict[str, Any]]:
        """The result vector of an instant query through Prometheus's HTTP API."""
        url = (f"http://127.0.0.1:{self.prom_port}/api/v1/query?"
               + urllib.parse.urlencode({"query": promql}))
        with urllib.request.urlopen(url, timeout=10) as answer:
            doc = json.load(answer)
        assert doc["status"] == "success", doc
        return list(doc["data"]["result"])

    def local(self) -> httpx.Client:
        """A client of the local socket (root: the host admin)."""
        return httpx.Client(transport=httpx.HTTPTransport(uds=str(self.sock)),
                            base_url="http://popek", timeout=60)


def _stop(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as answer:
            return bool(answer.status == 200)
    except OSError:
        return False


@pytest.fixture(scope="module")
def stack(popek_home: Path, minimal_image: str) -> Iterator[Stack]:
    if not Path(PROMETHEUS).exists():
        raise AssertionError("prometheus is not installed: make setup installs Debian's package")
    popek("launch", minimal_image, CT, "--container", "--memory", "128MiB")
    work = Path(tempfile.mkdtemp(prefix="hmet-"))
    procs: list[subprocess.Popen[Any]] = []
    try:
        created = popek("token", "create", "--project", "default", "--role", "viewer")
        secret = created.stdout.strip().splitlines()[-1]
        (work / "token").write_text(secret)
        (work / "token").chmod(0o600)
        sock, api_port = work / "api.sock", free_port()
        serve = subprocess.Popen([sys.executable, "-m", "popek", "serve", "--socket", str(sock),
                                  "--listen", f"127.0.0.1:{api_port}"],
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        procs.append(serve)
        assert serve.stdout is not None
        read_line(serve.stdout, 60, "popek serve to listen on its socket")
        line = read_line(serve.stdout, 60, "popek serve to listen on TCP")
        assert f"https://127.0.0.1:{api_port}" in line, line
        prom_port = free_port()
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s",
                       "evaluation_interval": "1s"},
            "scrape_configs": [{
                "job_name": "popek",
                "scheme": "https",
                "tls_config": {"ca_file": str(popek_home / "api" / "server.crt"),
                               "server_name": "localhost"},
                "authorization": {"type": "Bearer",
                                  "credentials_file": str(work / "token")},
                "static_configs": [{"targets": [f"127.0.0.1:{api_port}"]}],
            }],
        }
        (work / "prometheus.yml").write_text(json.dumps(config))  # YAML reads JSON
        log = work / "prometheus.log"
        with open(log, "wb") as out:
            prometheus = subprocess.Popen(
                [PROMETHEUS, f"--config.file={work / 'prometheus.yml'}",
                 f"--storage.tsdb.path={work / 'data'}",
                 f"--web.listen-address=127.0.0.1:{prom_port}"],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(prometheus)
        wait_for(lambda: prometheus.poll() is not None
                 or _ready(f"http://127.0.0.1:{prom_port}/-/ready"),
                 60, "prometheus to be ready")
        assert prometheus.poll() is None, log.read_text()[-2000:]
        yield Stack(serve, sock, api_port, prometheus, prom_port, log)
    finally:
        for proc in reversed(procs):
            _stop(proc)
        if procs and procs[0].stdout is not None:
            procs[0].stdout.close()
        shutil.rmtree(work, ignore_errors=True)
        popek("delete", "--force", CT, check=False)


def _memory_now() -> int:
    cg = container_cgroup(CT, "memory")
    name = "memory.current" if (cg / "memory.current").exists() else "memory.usage_in_bytes"
    return int((cg / name).read_text())


def test_prometheus_scrapes_the_instance_memory(stack: Stack) -> None:
    """PromQL through a real Prometheus returns the container's memory, close to its cgroup's."""
    promql = f'popek_instance_memory_bytes{{name="{CT}",project="default"}}'
    found: list[dict[str, Any]] = []

    def scraped() -> bool:
        assert stack.prometheus.poll() is None, stack.prom_log.read_text()[-2000:]
        found[:] = stack.query(promql)
        return bool(found)

    wait_for(scraped, 60, f"prometheus to have scraped {promql}")
    [series] = found
    assert series["metric"]["type"] == "container"
    assert series["metric"]["job"] == "popek"
    value = float(series["value"][1])
    cgroup = _memory_now()
    assert value > 0
    # the container idles: what the cgroup says now is within a factor of two of the sample
    assert cgroup / 2 <= value <= cgroup * 2, (value, cgroup)
    [up] = stack.query('up{job="popek"}')
    assert up["value"][1] == "1"


def test_scrapes_are_counted_and_the_token_sees_its_project_only(stack: Stack) -> None:
    """The API's own counters hold the scrapes; root on the socket sees what the token does."""
    def counted() -> bool:
        return bool(stack.query('popek_api_requests_total{route="/metrics",status="200"} > 1'))

    wait_for(counted, 60, "prometheus to see its own scrapes counted")
    with stack.local() as client:
        text = client.get("/metrics").text
    assert f'popek_instance_cpu_seconds_total{{name="{CT}",project="default",type="container"}}' \
        in text
    started = time.monotonic()
    with stack.local() as client:
        assert client.get("/metrics").status_code == 200
    assert time.monotonic() - started < 1.0


def test_a_vm_has_cpu_memory_and_qmp_disk_counters(stack: Stack, minimal_image: str) -> None:
    """A VM's counters: CPU and memory from its QEMU's cgroup, disk bytes asked of QEMU (QMP)."""
    vm = "hmet-vm"
    popek("launch", minimal_image, vm, "--vcpus", "1", "--memory", "128MiB")
    try:
        with stack.local() as client:
            text = client.get("/metrics").text
        samples = {(s.name, s.labels.get("name")): s.value
                   for fam in text_string_to_metric_families(text) for s in fam.samples
                   if s.labels.get("type") == "vm"}
        assert samples[("popek_instance_cpu_seconds_total", vm)] > 0
        assert samples[("popek_instance_memory_bytes", vm)] > 64 << 20  # the guest's RAM
        # the minimal image boots from its initrd: no block device, so QEMU says 0 bytes
        assert samples[("popek_instance_disk_read_bytes_total", vm)] == 0
        assert samples[("popek_instance_disk_write_bytes_total", vm)] == 0
    finally:
        popek("delete", "--force", vm, check=False)


def test_port_and_bridge_counters_of_a_network(stack: Stack, minimal_image: str) -> None:
    """A container on a network: its port's counters (its DHCP requests are packets it sent)
    and the network's bridge counters, read by the host admin on the local socket."""
    net, ct = "hmet-net", "hmet-netct"
    popek("network", "create", net, "--subnet", "10.219.47.0/24")
    try:
        popek("launch", minimal_image, ct, "--container", "--network", net)
        samples: dict[tuple[str, str], float] = {}

        def sent() -> bool:
            with stack.local() as client:
                text = client.get("/metrics").text
            samples.clear()
            for fam in text_string_to_metric_families(text):
                for s in fam.samples:
                    samples[(s.name, s.labels.get("name") or s.labels.get("network", ""))] = \
                        s.value
            return samples.get(("popek_instance_network_tx_packets_total", ct), 0) > 0 \
                and samples.get(("popek_network_rx_packets_total", net), 0) > 0

        wait_for(sent, 60, f"{ct}'s DHCP requests to show in its port's counters")
        assert samples[("popek_instance_network_tx_bytes_total", ct)] > 0
        assert ("popek_instance_network_rx_bytes_total", ct) in samples
        assert samples[("popek_network_rx_bytes_total", net)] > 0
    finally:
        popek("delete", "--force", ct, check=False)
        popek("network", "delete", "--force", net, check=False)
