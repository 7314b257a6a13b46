"""Configuration: one typed, frozen object built from TOML and validated when built.

Every error names the offending key (``signal[2].size: ...``) so that ``streamd check-config``
and a failed SIGHUP reload can tell the operator exactly what to fix.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import socket
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal, get_args

from streamd.keys import KeyFileError, read_authorized_keys, read_keypair, read_public_key

WindowKind = Literal["time", "count", "ewma"]
IngestMode = Literal["pull", "sub"]
PublishMode = Literal["record", "batch"]
LogFormat = Literal["logfmt", "json"]
LogLevel = Literal["debug", "info", "warning", "error"]

WINDOW_STATS = ("count", "sum", "mean", "std", "var", "min", "max", "first", "last", "volume", "vwap", "zscore")
EWMA_STATS = ("ewma",)

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ns|us|µs|ms|s|m|h)\s*$")
_UNIT_NS = {
    "ns": 1,
    "us": 1_000,
    "µs": 1_000,
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "m": 60_000_000_000,
    "h": 3_600_000_000_000,
}
# Upper bounds, so that a value that validates also works where it is used (README lists them).
MAX_DURATION_NS = 8760 * _UNIT_NS["h"]  # one year: far below int64, so ``t - size`` cannot wrap
MAX_HWM = 2**31 - 1  # ZeroMQ high-water marks are C ints
MAX_WORKERS = 256
MAX_BATCH_SIZE = 1_000_000
MAX_COUNT_WINDOW = 10_000_000
MAX_LOG_RATE = 10_000.0
MAX_PARTITIONS = 4096
MAX_REPLICAS = 5  # JetStream's limit
MIN_KEY_TTL_NS = 10_000_000  # 10 ms: the ingest sweeps every key_ttl/8, and a sweep costs a scan of its keys
MAX_KEYS = 1 << 40
LEASE_TTL_NS = (1_000_000_000, 600_000_000_000)  # below 1 s the server's expiry timer is too coarse
_NAME = re.compile(r"^[A-Za-z0-9_]+$")
_ENDPOINT = re.compile(r"^(tcp|ipc|inproc|pgm|epgm|ws|wss)://.+$")
_NATS_URL = re.compile(r"^(nats|tls|ws|wss)://[^\s/]+$")
_INSTANCE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # a KV key token and a message-id field


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the key."""


def parse_duration(value: object, key: str) -> int:
    """Parse ``"500us"``, ``"250ms"``, ``"1s"``, ``"5m"`` into integer nanoseconds, 1 ns to one year."""
    if isinstance(value, bool) or not isinstance(value, str):
        msg = f"{key}: expected a duration string such as '250ms', got {value!r}"
        raise ConfigError(msg)
    match = _DURATION.match(value)
    if match is None:
        msg = f"{key}: bad duration {value!r} (use a number and one of ns, us, ms, s, m, h)"
        raise ConfigError(msg)
    number, unit = match.groups()
    nanos = round(Fraction(number) * _UNIT_NS[unit])
    if nanos <= 0:
        msg = f"{key}: duration must be positive, got {value!r}"
        raise ConfigError(msg)
    if nanos > MAX_DURATION_NS:
        msg = f"{key}: duration must be at most {format_duration(MAX_DURATION_NS)} (one year), got {value!r}"
        raise ConfigError(msg)
    return nanos


def format_duration(nanos: int) -> str:
    """Inverse of :func:`parse_duration` for whole units, used in logs and docs."""
    for unit in ("h", "m", "s", "ms", "us"):
        if nanos % _UNIT_NS[unit] == 0:
            return f"{nanos // _UNIT_NS[unit]}{unit}"
    return f"{nanos}ns"


@dataclass(frozen=True)
class SignalSpec:
    """What one signal computes: the window *specification*, never its state."""

    name: str
    window: WindowKind
    size: int  # nanoseconds for "time" and "ewma" (half-life), ticks for "count"
    stats: tuple[str, ...]
    emit_interval_ns: int = 0
    publish: PublishMode = "record"

    def same_window(self, other: SignalSpec) -> bool:
        """True when state built under ``other`` is valid for this spec (reload keeps it)."""
        return (self.name, self.window, self.size) == (other.name, other.window, other.size)


@dataclass(frozen=True)
class IngestConfig:
    mode: IngestMode = "pull"
    endpoints: tuple[str, ...] = ("tcp://127.0.0.1:5555",)
    subscribe: tuple[str, ...] = ("",)
    rcvhwm: int = 1_000
    max_queue_bytes: int = 256 << 20  # ticks held per ingest (buffered + handed, not applied), 32 bytes each


@dataclass(frozen=True)
class LatencyConfig:
    max_batch_delay_ns: int = 1_000_000
    max_batch_size: int = 10_000


@dataclass(frozen=True)
class WorkersConfig:
    count: int = 0  # 0 = one per CPU core
    queue_batches: int = 10_000  # ZeroMQ high-water mark between ingest and each worker

    def resolved_count(self) -> int:
        return self.count or (os.cpu_count() or 1)


@dataclass(frozen=True)
class PublishConfig:
    endpoint: str = "tcp://127.0.0.1:5556"
    sndhwm: int = 1_000_000


@dataclass(frozen=True)
class MetricsConfig:
    listen: str = "127.0.0.1:9108"

    def host_port(self) -> tuple[str, int]:
        host, _, port = self.listen.rpartition(":")
        return host or "0.0.0.0", int(port)


@dataclass(frozen=True)
class LogConfig:
    level: LogLevel = "info"
    format: LogFormat = "logfmt"
    rate_limit_per_s: float = 5.0  # per message kind, for anything an input can trigger


@dataclass(frozen=True)
class StateConfig:
    """``[state]``: how long a silent key keeps its state, how many keys may hold state at once, and
    where workers checkpoint their windows so that they outlive processes (``dir`` None = nowhere)."""

    key_ttl_ns: int = 3_600_000_000_000  # 0 = keys are never evicted
    max_keys: int = 1_000_000  # per daemon, split evenly across the ingests; 0 = no limit
    dir: str | None = None
    snapshot_interval_ns: int = 2_000_000_000
    journal_bytes: int = 256 << 20  # per ingest: ticks handed over since each worker's last checkpoint, 32 B each

    def max_keys_per_ingest(self, ingests: int) -> int:
        """Each ingest's share of ``max_keys`` (rounded up); 0 = no limit."""
        return -(-self.max_keys // ingests)


@dataclass(frozen=True)
class ShutdownConfig:
    graceful_timeout_ns: int = 5_000_000_000


def default_instance_name() -> str:
    """The host name, with what a KV key token cannot hold (dots of an FQDN) turned into '-'."""
    return re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname())[:64] or "streamd"


@dataclass(frozen=True)
class ClusterConfig:
    """``[cluster]``: present = this instance is one of several sharing partitions over NATS JetStream."""

    servers: tuple[str, ...]
    partitions: int = 64  # fixed for the life of a deployment: it decides every key's partition
    replicas: int = 3
    name: str = field(default_factory=default_instance_name)
    lease_ttl_ns: int = 6_000_000_000  # above a JetStream election (about 5 s), so leases outlive one
    replay_horizon_ns: int = 60_000_000_000  # replay at least this far back on takeover (count windows rely on it)


@dataclass(frozen=True)
class GatewayConfig:
    """``[gateway]``: what ``streamd gateway`` merges (every instance's ``publish.endpoint``) and where."""

    upstreams: tuple[str, ...]
    endpoint: str = "tcp://127.0.0.1:5556"
    sndhwm: int = 1_000_000


@dataclass(frozen=True)
class SecurityConfig:
    """CURVE on every public socket (the ingest endpoints and the publish endpoint).

    Only paths: they were checked at load, and each process reads the keys itself at start-up,
    so no secret travels in the pickled config or shows in its repr. ``curve_feed_public_key``
    is the feed publisher's public key, needed (only) in sub mode, where streamd is the client.
    """

    curve_secret_key: str
    curve_authorized_keys: str
    curve_feed_public_key: str | None = None


DEFAULT_SIGNALS: tuple[SignalSpec, ...] = (
    SignalSpec("px1s", "time", 1_000_000_000, ("count", "mean", "std", "min", "max", "vwap", "last", "zscore")),
    SignalSpec("mean100", "count", 100, ("mean", "std")),
    SignalSpec("ewma1s", "ewma", 1_000_000_000, ("ewma",)),
)


@dataclass(frozen=True)
class Config:
    ingest: IngestConfig = field(default_factory=IngestConfig)
    latency: LatencyConfig = field(default_factory=LatencyConfig)
    workers: WorkersConfig = field(default_factory=WorkersConfig)
    publish: PublishConfig = field(default_factory=PublishConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    log: LogConfig = field(default_factory=LogConfig)
    shutdown: ShutdownConfig = field(default_factory=ShutdownConfig)
    state: StateConfig = field(default_factory=StateConfig)
    signals: tuple[SignalSpec, ...] = DEFAULT_SIGNALS
    cluster: ClusterConfig | None = None
    gateway: GatewayConfig | None = None
    security: SecurityConfig | None = None
    source: str = "<built-in>"

    def digest(self) -> str:
        """Short, stable hash of the effective configuration (exported in build info)."""
        text = repr(replace(self, source=""))
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def _expect(value: object, kinds: type | tuple[type, ...], key: str, what: str) -> Any:
    if isinstance(value, bool) and bool not in (kinds if isinstance(kinds, tuple) else (kinds,)):
        msg = f"{key}: expected {what}, got {value!r}"
        raise ConfigError(msg)
    if not isinstance(value, kinds):
        msg = f"{key}: expected {what}, got {type(value).__name__} {value!r}"
        raise ConfigError(msg)
    return value


def _choice(value: object, literal: Any, key: str) -> Any:
    choices = get_args(literal)
    if value not in choices:
        msg = f"{key}: must be one of {', '.join(map(repr, choices))}, got {value!r}"
        raise ConfigError(msg)
    return value


def _bounded_int(value: object, key: str, minimum: int, maximum: int) -> int:
    number = _expect(value, int, key, "an integer")
    if number < minimum:
        msg = f"{key}: must be >= {minimum}, got {number}"
        raise ConfigError(msg)
    if number > maximum:
        msg = f"{key}: must be <= {maximum}, got {number}"
        raise ConfigError(msg)
    return int(number)


def endpoint_problem(text: str) -> str | None:
    """Why ``text`` is not a ZeroMQ endpoint, or None; shared with the command line's ``--endpoint``."""
    if _ENDPOINT.match(text):
        return None
    return f"bad endpoint {text!r} (expected e.g. 'tcp://127.0.0.1:5555' or 'ipc:///run/streamd/ingest')"


def _endpoint(value: object, key: str) -> str:
    text = _expect(value, str, key, "a ZeroMQ endpoint string")
    problem = endpoint_problem(text)
    if problem is not None:
        msg = f"{key}: {problem}"
        raise ConfigError(msg)
    return str(text)


def _endpoints(value: object, key: str) -> tuple[str, ...]:
    items = _expect(value, list, key, "a list of endpoints")
    if not items:
        msg = f"{key}: needs at least one endpoint"
        raise ConfigError(msg)
    return tuple(_endpoint(item, f"{key}[{i}]") for i, item in enumerate(items))


def _reject_unknown(table: Mapping[str, Any], allowed: set[str], prefix: str) -> None:
    for name in table:
        if name not in allowed:
            where = f"{prefix}.{name}" if prefix else name
            msg = f"{where}: unknown key (allowed: {', '.join(sorted(allowed))})"
            raise ConfigError(msg)


def _table(raw: Mapping[str, Any], name: str, allowed: set[str]) -> Mapping[str, Any]:
    table: Mapping[str, Any] = _expect(raw.get(name, {}), dict, name, "a table")
    _reject_unknown(table, allowed, name)
    return table


def _build_ingest(raw: Mapping[str, Any]) -> IngestConfig:
    table = _table(raw, "ingest", {"mode", "endpoints", "subscribe", "rcvhwm", "max_queue_bytes"})
    default = IngestConfig()
    subscribe = table.get("subscribe", list(default.subscribe))
    _expect(subscribe, list, "ingest.subscribe", "a list of topic prefixes")
    return IngestConfig(
        mode=_choice(table.get("mode", default.mode), IngestMode, "ingest.mode"),
        endpoints=_endpoints(table.get("endpoints", list(default.endpoints)), "ingest.endpoints"),
        subscribe=tuple(_expect(s, str, f"ingest.subscribe[{i}]", "a string") for i, s in enumerate(subscribe)),
        rcvhwm=_bounded_int(table.get("rcvhwm", default.rcvhwm), "ingest.rcvhwm", 0, MAX_HWM),
        max_queue_bytes=_bounded_int(
            table.get("max_queue_bytes", default.max_queue_bytes), "ingest.max_queue_bytes", 1 << 20, 1 << 40
        ),
    )


def _build_latency(raw: Mapping[str, Any]) -> LatencyConfig:
    table = _table(raw, "latency", {"max_batch_delay", "max_batch_size"})
    default = LatencyConfig()
    delay = table.get("max_batch_delay")
    return LatencyConfig(
        max_batch_delay_ns=default.max_batch_delay_ns
        if delay is None
        else parse_duration(delay, "latency.max_batch_delay"),
        max_batch_size=_bounded_int(
            table.get("max_batch_size", default.max_batch_size), "latency.max_batch_size", 1, MAX_BATCH_SIZE
        ),
    )


def _build_workers(raw: Mapping[str, Any]) -> WorkersConfig:
    table = _table(raw, "workers", {"count", "queue_batches"})
    default = WorkersConfig()
    return WorkersConfig(
        count=_bounded_int(table.get("count", default.count), "workers.count", 0, MAX_WORKERS),
        queue_batches=_bounded_int(
            table.get("queue_batches", default.queue_batches), "workers.queue_batches", 1, MAX_HWM
        ),
    )


def _build_publish(raw: Mapping[str, Any]) -> PublishConfig:
    table = _table(raw, "publish", {"endpoint", "sndhwm"})
    default = PublishConfig()
    return PublishConfig(
        endpoint=_endpoint(table.get("endpoint", default.endpoint), "publish.endpoint"),
        sndhwm=_bounded_int(table.get("sndhwm", default.sndhwm), "publish.sndhwm", 0, MAX_HWM),
    )


def _build_metrics(raw: Mapping[str, Any]) -> MetricsConfig:
    table = _table(raw, "metrics", {"listen"})
    listen = _expect(table.get("listen", MetricsConfig().listen), str, "metrics.listen", "'host:port'")
    _, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        msg = f"metrics.listen: expected 'host:port' with a port 0-65535, got {listen!r}"
        raise ConfigError(msg)
    return MetricsConfig(listen=listen)


def _build_log(raw: Mapping[str, Any]) -> LogConfig:
    table = _table(raw, "log", {"level", "format", "rate_limit_per_s"})
    default = LogConfig()
    rate = _expect(
        table.get("rate_limit_per_s", default.rate_limit_per_s), (int, float), "log.rate_limit_per_s", "a number"
    )
    # The limiter's burst is one second's worth of lines, so below 1 line/s it would never log.
    if not (math.isfinite(rate) and 1 <= rate <= MAX_LOG_RATE):
        msg = f"log.rate_limit_per_s: must be between 1 and {MAX_LOG_RATE:g}, got {rate}"
        raise ConfigError(msg)
    return LogConfig(
        level=_choice(table.get("level", default.level), LogLevel, "log.level"),
        format=_choice(table.get("format", default.format), LogFormat, "log.format"),
        rate_limit_per_s=float(rate),
    )


def _build_shutdown(raw: Mapping[str, Any]) -> ShutdownConfig:
    table = _table(raw, "shutdown", {"graceful_timeout"})
    timeout = table.get("graceful_timeout")
    if timeout is None:
        return ShutdownConfig()
    return ShutdownConfig(graceful_timeout_ns=parse_duration(timeout, "shutdown.graceful_timeout"))


def _build_state(raw: Mapping[str, Any]) -> StateConfig:
    table = _table(raw, "state", {"key_ttl", "max_keys", "dir", "snapshot_interval", "journal_bytes"})
    default = StateConfig()
    ttl = table.get("key_ttl")
    if ttl is None:
        ttl_ns = default.key_ttl_ns
    elif isinstance(ttl, str) and ttl.strip() == "0":
        ttl_ns = 0
    else:
        ttl_ns = parse_duration(ttl, "state.key_ttl")
        if ttl_ns < MIN_KEY_TTL_NS:
            msg = f"state.key_ttl: must be at least {format_duration(MIN_KEY_TTL_NS)} (or '0' = never), got {ttl!r}"
            raise ConfigError(msg)
    directory = table.get("dir")
    if directory is not None and not _expect(directory, str, "state.dir", "a directory path"):
        msg = "state.dir: empty path (leave the key out to keep no state)"
        raise ConfigError(msg)
    interval = table.get("snapshot_interval")
    return StateConfig(
        key_ttl_ns=ttl_ns,
        max_keys=_bounded_int(table.get("max_keys", default.max_keys), "state.max_keys", 0, MAX_KEYS),
        dir=directory,
        snapshot_interval_ns=default.snapshot_interval_ns
        if interval is None
        else parse_duration(interval, "state.snapshot_interval"),
        journal_bytes=_bounded_int(
            table.get("journal_bytes", default.journal_bytes), "state.journal_bytes", 1 << 20, 1 << 40
        ),
    )


def _build_cluster(raw: Mapping[str, Any]) -> ClusterConfig | None:
    if "cluster" not in raw:
        return None
    table = _table(raw, "cluster", {"servers", "partitions", "replicas", "name", "lease_ttl", "replay_horizon"})
    if "servers" not in table:
        msg = "cluster.servers: required (the NATS servers, e.g. ['nats://10.0.0.1:4222'])"
        raise ConfigError(msg)
    servers = _expect(table["servers"], list, "cluster.servers", "a list of NATS URLs")
    if not servers:
        msg = "cluster.servers: needs at least one NATS URL"
        raise ConfigError(msg)
    for i, url in enumerate(servers):
        if not _NATS_URL.match(_expect(url, str, f"cluster.servers[{i}]", "a NATS URL")):
            msg = f"cluster.servers[{i}]: bad NATS URL {url!r} (expected e.g. 'nats://10.0.0.1:4222')"
            raise ConfigError(msg)
    default = ClusterConfig(servers=())
    name = _expect(table.get("name", default.name), str, "cluster.name", "a string")
    if not _INSTANCE.match(name):
        msg = f"cluster.name: {name!r} must be 1-64 of [A-Za-z0-9_-]"
        raise ConfigError(msg)
    ttl = default.lease_ttl_ns if "lease_ttl" not in table else parse_duration(table["lease_ttl"], "cluster.lease_ttl")
    if not LEASE_TTL_NS[0] <= ttl <= LEASE_TTL_NS[1]:
        msg = f"cluster.lease_ttl: must be between 1s and 10m, got {table['lease_ttl']!r}"
        raise ConfigError(msg)
    return ClusterConfig(
        servers=tuple(servers),
        partitions=_bounded_int(table.get("partitions", default.partitions), "cluster.partitions", 1, MAX_PARTITIONS),
        replicas=_bounded_int(table.get("replicas", default.replicas), "cluster.replicas", 1, MAX_REPLICAS),
        name=name,
        lease_ttl_ns=ttl,
        replay_horizon_ns=default.replay_horizon_ns
        if "replay_horizon" not in table
        else parse_duration(table["replay_horizon"], "cluster.replay_horizon"),
    )


def _build_gateway(raw: Mapping[str, Any]) -> GatewayConfig | None:
    if "gateway" not in raw:
        return None
    table = _table(raw, "gateway", {"upstreams", "endpoint", "sndhwm"})
    if "upstreams" not in table:
        msg = "gateway.upstreams: required (every instance's publish.endpoint)"
        raise ConfigError(msg)
    default = GatewayConfig(upstreams=())
    return GatewayConfig(
        upstreams=_endpoints(table["upstreams"], "gateway.upstreams"),
        endpoint=_endpoint(table.get("endpoint", default.endpoint), "gateway.endpoint"),
        sndhwm=_bounded_int(table.get("sndhwm", default.sndhwm), "gateway.sndhwm", 0, MAX_HWM),
    )


def _key_path(value: object, key: str, relative_to: Path) -> str:
    text = _expect(value, str, key, "a file or directory path")
    if not text:
        msg = f"{key}: expected a path, got an empty string"
        raise ConfigError(msg)
    return str(relative_to / text)


def _checked(read: Any, path: str, key: str) -> None:
    try:
        read(path)
    except KeyFileError as exc:
        msg = f"{key}: {exc}"
        raise ConfigError(msg) from None


def _build_security(raw: Mapping[str, Any], mode: IngestMode, config_dir: Path) -> SecurityConfig | None:
    """Paths resolved and every key file read once, so a missing or bad key fails at load.

    A relative ``curve_secret_key`` is looked up in ``$CREDENTIALS_DIRECTORY`` when systemd
    set it (``LoadCredential=``), else next to the config file, so the same config passes
    ``check-config`` outside the unit and runs inside it. The other paths are relative to
    the config file.
    """
    if "security" not in raw:
        return None
    allowed = {"curve_secret_key", "curve_authorized_keys", "curve_feed_public_key"}
    table = _table(raw, "security", allowed)
    for required in ("curve_secret_key", "curve_authorized_keys"):
        if required not in table:
            msg = f"security.{required}: required (see docs/deploy.md, 'CURVE')"
            raise ConfigError(msg)
    feed_key = "security.curve_feed_public_key"
    if mode == "sub" and "curve_feed_public_key" not in table:
        msg = f"{feed_key}: required in ingest.mode = 'sub' (the public key of the feed streamd connects to)"
        raise ConfigError(msg)
    if mode == "pull" and "curve_feed_public_key" in table:
        msg = f"{feed_key}: only used in ingest.mode = 'sub'; in pull mode producers are clients, remove it"
        raise ConfigError(msg)
    credentials = os.environ.get("CREDENTIALS_DIRECTORY")
    security = SecurityConfig(
        curve_secret_key=_key_path(
            table["curve_secret_key"], "security.curve_secret_key", Path(credentials) if credentials else config_dir
        ),
        curve_authorized_keys=_key_path(table["curve_authorized_keys"], "security.curve_authorized_keys", config_dir),
        curve_feed_public_key=None
        if mode == "pull"
        else _key_path(table["curve_feed_public_key"], feed_key, config_dir),
    )
    _checked(read_keypair, security.curve_secret_key, "security.curve_secret_key")
    _checked(read_authorized_keys, security.curve_authorized_keys, "security.curve_authorized_keys")
    if security.curve_feed_public_key is not None:
        _checked(read_public_key, security.curve_feed_public_key, feed_key)
    return security


def _build_signal(table: object, key: str) -> SignalSpec:
    _expect(table, dict, key, "a table")
    assert isinstance(table, dict)
    _reject_unknown(table, {"name", "window", "size", "stats", "emit_interval", "publish"}, key)
    for required in ("name", "window", "size"):
        if required not in table:
            msg = f"{key}.{required}: required"
            raise ConfigError(msg)
    name = _expect(table["name"], str, f"{key}.name", "a string")
    if not _NAME.match(name):
        msg = f"{key}.name: {name!r} must match [A-Za-z0-9_]+"
        raise ConfigError(msg)
    window = _choice(table["window"], WindowKind, f"{key}.window")
    if window == "count":
        size = _bounded_int(table["size"], f"{key}.size", 1, MAX_COUNT_WINDOW)
    else:
        size = parse_duration(table["size"], f"{key}.size")
    allowed = EWMA_STATS if window == "ewma" else WINDOW_STATS
    stats_raw = table.get("stats", list(allowed[:1] if window == "ewma" else ("count", "mean", "last")))
    _expect(stats_raw, list, f"{key}.stats", "a list of stat names")
    if not stats_raw:
        msg = f"{key}.stats: needs at least one stat"
        raise ConfigError(msg)
    for i, stat in enumerate(stats_raw):
        if stat not in allowed:
            msg = f"{key}.stats[{i}]: {stat!r} is not a {window}-window stat (allowed: {', '.join(allowed)})"
            raise ConfigError(msg)
    if len(set(stats_raw)) != len(stats_raw):
        msg = f"{key}.stats: duplicate stat names"
        raise ConfigError(msg)
    interval = table.get("emit_interval")
    return SignalSpec(
        name=name,
        window=window,
        size=size,
        stats=tuple(stats_raw),
        emit_interval_ns=0 if interval is None else parse_duration(interval, f"{key}.emit_interval"),
        publish=_choice(table.get("publish", "record"), PublishMode, f"{key}.publish"),
    )


def _build_signals(raw: Mapping[str, Any]) -> tuple[SignalSpec, ...]:
    if "signal" not in raw:
        return DEFAULT_SIGNALS
    tables = _expect(raw["signal"], list, "signal", "an array of tables ([[signal]])")
    if not tables:
        msg = "signal: at least one [[signal]] is required"
        raise ConfigError(msg)
    specs = tuple(_build_signal(table, f"signal[{i}]") for i, table in enumerate(tables))
    seen: set[str] = set()
    for i, spec in enumerate(specs):
        if spec.name in seen:
            msg = f"signal[{i}].name: duplicate signal name {spec.name!r}"
            raise ConfigError(msg)
        seen.add(spec.name)
    return specs


def config_from_mapping(raw: Mapping[str, Any], source: str = "<mapping>", config_dir: Path | None = None) -> Config:
    """Build and validate a :class:`Config` from parsed TOML; relative key paths start at ``config_dir``."""
    allowed = {
        "ingest",
        "latency",
        "workers",
        "publish",
        "metrics",
        "log",
        "shutdown",
        "state",
        "signal",
        "cluster",
        "gateway",
        "security",
    }
    _reject_unknown(raw, allowed, "")
    ingest = _build_ingest(raw)
    return Config(
        ingest=ingest,
        latency=_build_latency(raw),
        workers=_build_workers(raw),
        publish=_build_publish(raw),
        metrics=_build_metrics(raw),
        log=_build_log(raw),
        shutdown=_build_shutdown(raw),
        state=_build_state(raw),
        signals=_build_signals(raw),
        cluster=_build_cluster(raw),
        gateway=_build_gateway(raw),
        security=_build_security(raw, ingest.mode, config_dir or Path.cwd()),
        source=source,
    )


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate a TOML config file; every failure is a :class:`ConfigError`.

    A file without a single setting is an error rather than the built-in config: it is far
    more likely a truncated or wrong file than a request for the defaults.
    """
    file = Path(path)
    try:
        data = file.read_bytes()
    except OSError as exc:
        msg = f"cannot read config {str(file)!r}: {exc.strerror or exc}"
        raise ConfigError(msg) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        msg = f"{file}:{line}: not UTF-8 (byte 0x{data[exc.start]:02x}); TOML files must be saved as UTF-8"
        raise ConfigError(msg) from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        msg = f"{file}: not valid TOML: {exc}"
        raise ConfigError(msg) from None
    if not raw:
        msg = f"{file}: no settings at all (empty, or only comments); see deploy/streamd.toml for a full example"
        raise ConfigError(msg)
    return config_from_mapping(raw, source=str(file), config_dir=file.absolute().parent)


def with_overrides(config: Config, *, workers: int | None = None) -> Config:
    """Apply command-line overrides (``--workers``) on top of a loaded config."""
    if workers is None:
        return config
    if not 0 <= workers <= MAX_WORKERS:
        msg = f"--workers: must be between 0 and {MAX_WORKERS}, got {workers}"
        raise ConfigError(msg)
    return replace(config, workers=replace(config.workers, count=workers))
