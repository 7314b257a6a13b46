"""streamd gateway: two instances' PUB sockets reach one subscriber through one endpoint; config errors are one line."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import zmq

from streamd.config import ConfigError, config_from_mapping
from tests.helpers import free_port, stop_process


def start_gateway(config: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "streamd", "gateway", "--config", str(config)], stdout=out, stderr=subprocess.STDOUT
        )


def wait_for_line(log: Path, line: str, proc: subprocess.Popen[bytes], timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while line not in log.read_text(errors="replace"):
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)


@pytest.mark.timeout(40)
def test_two_instances_reach_one_subscriber(tmp_path: Path) -> None:
    """Records published by two fake instances arrive on the gateway's endpoint, filtered by the subscription."""
    upstreams = [f"tcp://127.0.0.1:{free_port()}" for _ in range(2)]
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    config = tmp_path / "gateway.toml"
    config.write_text(f"[gateway]\nupstreams = {upstreams!r}\nendpoint = {endpoint!r}\n".replace("'", '"'))
    ctx: zmq.Context[Any] = zmq.Context()
    instances = [ctx.socket(zmq.PUB) for _ in upstreams]
    for sock, address in zip(instances, upstreams, strict=True):
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(address)
    subscriber = ctx.socket(zmq.SUB)
    subscriber.setsockopt(zmq.LINGER, 0)
    subscriber.setsockopt(zmq.SUBSCRIBE, b"px1s.")
    subscriber.connect(endpoint)
    proc = start_gateway(config, tmp_path / "gateway.log")
    try:
        wait_for_line(tmp_path / "gateway.log", "streamd gateway ready", proc)
        got: set[bytes] = set()
        deadline = time.monotonic() + 20
        while got != {b"px1s.A", b"px1s.B"} and time.monotonic() < deadline:
            instances[0].send_multipart([b"px1s.A", b"{}"])
            instances[1].send_multipart([b"px1s.B", b"{}"])
            instances[1].send_multipart([b"mean100.B", b"{}"])
            while subscriber.poll(50):
                got.add(subscriber.recv_multipart()[0])
        assert got == {b"px1s.A", b"px1s.B"}
    finally:
        assert stop_process(proc) == 0
        for sock in [*instances, subscriber]:
            sock.close(0)
        ctx.term()
    assert "streamd gateway stopped" in (tmp_path / "gateway.log").read_text()


def test_gateway_without_its_section_is_one_error_line(tmp_path: Path) -> None:
    """A config with no [gateway] ends with one line and exit code 2."""
    config = tmp_path / "plain.toml"
    config.write_text('[log]\nlevel = "info"\n')
    command = [sys.executable, "-m", "streamd", "gateway", "--config", str(config)]
    result = subprocess.run(command, check=False, capture_output=True, timeout=20)
    assert result.returncode == 2
    assert result.stderr.decode().strip().splitlines() == [
        f"streamd: error: {config}: no [gateway] section (needs at least gateway.upstreams)"
    ]


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"cluster": {}}, "cluster.servers: required"),
        ({"cluster": {"servers": ["http://x:1"]}}, "cluster.servers[0]: bad NATS URL"),
        ({"cluster": {"servers": ["nats://a:4222"], "partitions": 0}}, "cluster.partitions: must be >= 1"),
        ({"cluster": {"servers": ["nats://a:4222"], "partitions": 4097}}, "cluster.partitions: must be <= 4096"),
        ({"cluster": {"servers": ["nats://a:4222"], "replicas": 6}}, "cluster.replicas: must be <= 5"),
        ({"cluster": {"servers": ["nats://a:4222"], "name": "a.b"}}, "cluster.name:"),
        ({"cluster": {"servers": ["nats://a:4222"], "lease_ttl": "100ms"}}, "cluster.lease_ttl: must be between"),
        ({"cluster": {"servers": ["nats://a:4222"], "lease": "3s"}}, "cluster.lease: unknown key"),
        ({"gateway": {}}, "gateway.upstreams: required"),
        ({"gateway": {"upstreams": ["nope"]}}, "gateway.upstreams[0]: bad endpoint"),
    ],
)
def test_cluster_and_gateway_errors_name_the_key(raw: dict[str, Any], message: str) -> None:
    """Each bad [cluster] or [gateway] value is rejected with its key's name."""
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        config_from_mapping(raw)


def test_cluster_defaults() -> None:
    """Only servers are required; the name defaults to the host name, made KV-safe."""
    cluster = config_from_mapping({"cluster": {"servers": ["nats://a:4222"], "lease_ttl": "2s"}}).cluster
    assert cluster is not None
    assert (cluster.partitions, cluster.replicas, cluster.lease_ttl_ns) == (64, 3, 2_000_000_000)
    assert cluster.name and "." not in cluster.name
    assert config_from_mapping({}).cluster is None
