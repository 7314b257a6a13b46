"""CURVE: key files, config checks, the ZAP verdict, and a real daemon refusing what is not authorized."""

from __future__ import annotations

import contextlib
import signal
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq
from zmq.utils import z85

from streamd.config import ConfigError, config_from_mapping, load_config
from streamd.curve import zap_verdict
from streamd.keys import KeyFileError, read_authorized_keys, read_keypair, read_public_key, write_keypair
from tests.helpers import Daemon, Subscriber, free_port, make_ticks, running_daemon
from tests.test_cli import assert_one_error_line, streamd

SocketSetup = Callable[[zmq.Socket[Any]], None]


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    """server keypair, clients.d with client 'good', and the unauthorized keypair 'stranger'."""
    folder = tmp_path / "keys"
    (folder / "clients.d").mkdir(parents=True)
    write_keypair(folder, "server")
    write_keypair(folder, "good")
    write_keypair(folder, "stranger")
    (folder / "clients.d" / "good.key").write_bytes((folder / "good.key").read_bytes())
    return folder


def security_toml(keys: Path, extra: str = "") -> str:
    return f"""
[security]
curve_secret_key = "{keys / "server.key_secret"}"
curve_authorized_keys = "{keys / "clients.d"}"
{extra}
"""


def curve_client(keys: Path, name: str, server: Path | None = None) -> SocketSetup:
    """Socket set-up for a CURVE client with keypair ``name`` of ``keys`` (server key: server.key)."""
    public, secret = read_keypair(keys / f"{name}.key_secret")
    server_key = read_public_key(server or keys / "server.key")

    def setup(sock: zmq.Socket[Any]) -> None:
        sock.curve_publickey = public
        sock.curve_secretkey = secret
        sock.curve_serverkey = server_key

    return setup


def plain(sock: zmq.Socket[Any]) -> None:
    """No security at all: a client as it was before CURVE."""


def producer(daemon: Daemon, setup: SocketSetup) -> zmq.Socket[Any]:
    sock = daemon.ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 0)
    setup(sock)
    sock.connect(daemon.ingest)
    return sock


def failures(daemon: Daemon, endpoint: str) -> float:
    return daemon.scrape().get(f'streamd_auth_failures_total{{endpoint="{endpoint}"}}', 0.0)


# key files -------------------------------------------------------------------------------
def test_keygen_writes_a_public_and_a_private_certificate(tmp_path: Path) -> None:
    """NAME.key is 0644 and public only; NAME.key_secret is 0600 and holds the same public key."""
    public, secret = write_keypair(tmp_path, "node1")
    assert stat.S_IMODE(public.stat().st_mode) == 0o644
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    pair = read_keypair(secret)
    assert read_public_key(public) == pair[0]
    assert zmq.curve_public(pair[1]) == pair[0]
    assert b"secret-key" not in public.read_bytes()


def test_keygen_never_overwrites(tmp_path: Path) -> None:
    """A second keygen under the same name fails, naming the file, and leaves the first keypair alone."""
    _, secret = write_keypair(tmp_path, "server")
    before = secret.read_bytes()
    with pytest.raises(KeyFileError, match=r"server\.key: already exists"):
        write_keypair(tmp_path, "server")
    assert secret.read_bytes() == before


def test_keygen_command_errors_are_one_line(tmp_path: Path) -> None:
    """streamd keygen into a missing directory: one 'streamd: error:' line, exit 2; --name works."""
    assert_one_error_line(streamd("keygen", str(tmp_path / "nope")), f"{tmp_path / 'nope'}: no such directory")
    made = streamd("keygen", "--name", "feed", env={"STREAMD_KEYGEN_DIR": str(tmp_path)})
    assert made.returncode == 0, made.stderr
    assert (tmp_path / "feed.key").is_file() and (tmp_path / "feed.key_secret").is_file()


def test_authorized_directory_refuses_a_secret_certificate(keys: Path) -> None:
    """A .key_secret copied into clients.d under a .key name is refused rather than published."""
    assert read_authorized_keys(keys / "clients.d") == {read_public_key(keys / "good.key")}
    (keys / "clients.d" / "oops.key").write_bytes((keys / "stranger.key_secret").read_bytes())
    with pytest.raises(KeyFileError, match="holds a secret key"):
        read_authorized_keys(keys / "clients.d")


# configuration --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"curve_secret_key": "missing.key_secret"}, "security.curve_secret_key: .*missing.key_secret: no such file"),
        ({"curve_secret_key": "server.key"}, "security.curve_secret_key: .*holds no secret key"),
        ({"curve_secret_key": "garbage"}, "security.curve_secret_key: .*not a ZeroMQ certificate"),
        ({"curve_authorized_keys": "nope.d"}, "security.curve_authorized_keys: .*nope.d: no such directory"),
        ({"curve_feed_public_key": "server.key"}, "security.curve_feed_public_key: only used in ingest.mode = 'sub'"),
        ({"curve_secret_key": None}, "security.curve_secret_key: required"),
        ({"curve_public_key": "x"}, "security.curve_public_key: unknown key"),
    ],
)
def test_bad_security_settings_name_the_key(keys: Path, change: dict[str, Any], error: str) -> None:
    """Missing, unreadable or misplaced key files fail at load with the key's name."""
    (keys / "garbage").write_text("not a certificate\n")
    table = {"curve_secret_key": "server.key_secret", "curve_authorized_keys": "clients.d"} | change
    raw = {"security": {k: v for k, v in table.items() if v is not None}}
    with pytest.raises(ConfigError, match=f"^{error}"):
        config_from_mapping(raw, config_dir=keys)


def test_sub_mode_needs_the_feed_public_key(keys: Path) -> None:
    """In sub mode streamd is the feed's CURVE client, so it must know the feed's public key."""
    raw: dict[str, Any] = {"ingest": {"mode": "sub"}, "security": {"curve_secret_key": "server.key_secret"}}
    raw["security"]["curve_authorized_keys"] = "clients.d"
    with pytest.raises(ConfigError, match=r"^security\.curve_feed_public_key: required in ingest\.mode = 'sub'"):
        config_from_mapping(raw, config_dir=keys)
    raw["security"]["curve_feed_public_key"] = "good.key"
    config = config_from_mapping(raw, config_dir=keys)
    assert config.security is not None
    assert config.security.curve_feed_public_key == str(keys / "good.key")


def test_secret_key_is_found_in_the_systemd_credentials_directory(
    keys: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A relative curve_secret_key is read from $CREDENTIALS_DIRECTORY when set, else next to the config."""
    config_file = keys / "streamd.toml"
    config_file.write_text('[security]\ncurve_secret_key = "server.key_secret"\ncurve_authorized_keys = "clients.d"\n')
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    security = load_config(config_file).security
    assert security is not None and security.curve_secret_key == str(keys / "server.key_secret")
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))
    with pytest.raises(ConfigError, match=r"^security\.curve_secret_key: .*/credentials/server\.key_secret: no such"):
        load_config(config_file)
    (credentials / "server.key_secret").write_bytes((keys / "server.key_secret").read_bytes())
    security = load_config(config_file).security
    assert security is not None and security.curve_secret_key == str(credentials / "server.key_secret")
    assert security.curve_authorized_keys == str(keys / "clients.d")


def test_check_config_names_a_missing_key_file(keys: Path) -> None:
    """check-config: one line naming security.curve_secret_key, exit 2."""
    config = keys / "streamd.toml"
    config.write_text('[security]\ncurve_secret_key = "gone.key_secret"\ncurve_authorized_keys = "clients.d"\n')
    assert_one_error_line(
        streamd("check-config", str(config)), f"security.curve_secret_key: {keys / 'gone.key_secret'}: no such file"
    )


# the ZAP verdict ------------------------------------------------------------------------
def test_zap_admits_only_authorized_curve_keys() -> None:
    """200 with the Z85 key as user id for an authorized key; 400 for another key or a non-CURVE request."""
    known, _ = zmq.curve_keypair()
    other, _ = zmq.curve_keypair()

    def request(mechanism: bytes, *credentials: bytes) -> list[bytes]:
        return [b"1.0", b"7", b"", b"10.0.0.9", b"", mechanism, *credentials]

    allowed = zap_verdict(request(b"CURVE", z85.decode(known)), frozenset({known}))
    assert allowed.allowed and allowed.reply == [b"1.0", b"7", b"200", b"OK", known, b""]
    refused = zap_verdict(request(b"CURVE", z85.decode(other)), frozenset({known}))
    assert not refused.allowed and refused.reply[2] == b"400"
    assert (refused.client_key, refused.address) == (other.decode(), "10.0.0.9")
    for bad in (request(b"NULL"), request(b"PLAIN", b"u", b"p"), [b"1.0"], [b"2.0", *request(b"CURVE")[1:]]):
        assert zap_verdict(bad, frozenset({known})).reply[2] == b"400"


# a real daemon -----------------------------------------------------------------------------
@pytest.fixture
def secured_daemon(tmp_path: Path, keys: Path) -> Iterator[Daemon]:
    with running_daemon(tmp_path, workers=1, extra_toml=security_toml(keys)) as daemon:
        yield daemon


def _send_ticks(sock: zmq.Socket[Any], ticks: list[dict[str, Any]]) -> None:
    """Send without blocking: a refused client has no peer, so its socket may refuse to queue."""
    for tick in ticks:
        with contextlib.suppress(zmq.Again):
            sock.send(msgpack.packb(tick), zmq.NOBLOCK)


@pytest.mark.timeout(90)
def test_only_authorized_clients_get_through(secured_daemon: Daemon, keys: Path) -> None:
    """Ticks in and records out over CURVE for the authorized key; wrong-key and plain clients get nothing, counted."""
    daemon = secured_daemon
    good = producer(daemon, curve_client(keys, "good"))
    subscriber = Subscriber(daemon, setup=curve_client(keys, "good"))
    outsiders = [Subscriber(daemon, setup=curve_client(keys, "stranger")), Subscriber(daemon, setup=plain)]
    try:
        subscriber.sync(send=good.send)
        ticks = make_ticks(200, keys=5, seed=3)
        _send_ticks(good, ticks)
        newest = {tick["k"]: tick["t"] for tick in ticks}
        subscriber.collect(lambda: newest.items() <= {(r["k"], r["t"]) for r in subscriber.records})
        books = daemon.wait_idle()
        received = books["streamd_ticks_received_total"]
        daemon.wait_for(lambda: failures(daemon, "publish") >= 2, 20, "both refused subscribers counted")
        for outsider in outsiders:
            outsider.drain(0.3)
            assert outsider.records == []

        before = failures(daemon, "ingest")
        intruders = [producer(daemon, curve_client(keys, "stranger")), producer(daemon, plain)]
        for intruder in intruders:
            _send_ticks(intruder, make_ticks(50, seed=4))
        daemon.wait_for(lambda: failures(daemon, "ingest") >= before + 2, 20, "both refused producers counted")
        time.sleep(0.5)
        assert daemon.scrape()["streamd_ticks_received_total"] == received
        log = daemon.log()
        assert "CURVE client refused: its public key is not authorized" in log
        assert read_public_key(keys / "stranger.key").decode() in log
        assert "CURVE handshake failed: the peer " in log  # "does not use CURVE", or "hung up"
        for intruder in intruders:
            intruder.close(0)
    finally:
        good.close(0)
        subscriber.close()
        for outsider in outsiders:
            outsider.close()


@pytest.mark.timeout(90)
def test_sighup_rereads_the_authorized_keys(secured_daemon: Daemon, keys: Path) -> None:
    """A client key dropped into clients.d is admitted after SIGHUP, without a restart.

    A refused ZeroMQ client does not retry on its own (an authentication failure is final for
    that connection), so the newcomer connects again after the reload.
    """
    daemon = secured_daemon
    good = producer(daemon, curve_client(keys, "good"))
    refused = Subscriber(daemon, setup=curve_client(keys, "stranger"))
    try:
        daemon.wait_for(lambda: failures(daemon, "publish") >= 1, 20, "the unknown subscriber refused")
        (keys / "clients.d" / "stranger.key").write_bytes((keys / "stranger.key").read_bytes())
        daemon.proc.send_signal(signal.SIGHUP)
        daemon.wait_for(lambda: daemon.log().count("authorized keys reloaded") == 2, 20, "supervisor and ingest reload")
        admitted = Subscriber(daemon, setup=curve_client(keys, "stranger"))
        try:
            admitted.sync(send=good.send)
        finally:
            admitted.close()
    finally:
        good.close(0)
        refused.close()


@pytest.mark.timeout(90)
def test_sub_mode_is_a_curve_client_of_the_feed(tmp_path: Path, keys: Path) -> None:
    """In sub mode streamd connects to a CURVE feed with its own keypair and the feed's public key."""
    feed_port = free_port()
    ctx = zmq.Context()
    feed = ctx.socket(zmq.PUB)
    feed.setsockopt(zmq.LINGER, 0)
    feed_public, feed_secret = read_keypair(keys / "good.key_secret")  # any keypair will do for the feed
    feed.curve_server = True
    feed.curve_publickey, feed.curve_secretkey = feed_public, feed_secret
    feed.bind(f"tcp://127.0.0.1:{feed_port}")
    extra = security_toml(keys, f'curve_feed_public_key = "{keys / "good.key"}"')
    try:
        with running_daemon(
            tmp_path, workers=1, extra_toml=extra, ingest=f"tcp://127.0.0.1:{feed_port}", ingest_toml='mode = "sub"'
        ) as daemon:
            subscriber = Subscriber(daemon, setup=curve_client(keys, "good"))
            try:
                subscriber.sync(send=lambda payload: feed.send_multipart([b"ticks", payload]))
            finally:
                subscriber.close()
    finally:
        feed.close(0)
        ctx.term()
