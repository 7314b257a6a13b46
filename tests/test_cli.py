"""The command line as a user meets it: every user error is one line and exit code 2, never a hang."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq

from tests.helpers import free_port

ROOT = Path(__file__).resolve().parent.parent
ERROR_LINE = re.compile(r"^streamd: error: .+$")


def streamd(
    *args: str, env: dict[str, str] | None = None, timeout: float = 30, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the real CLI with a clean STREAMD_* environment plus ``env``."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("STREAMD_")}
    return subprocess.run(
        [sys.executable, "-m", "streamd", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env={**clean, **(env or {})},
        input=stdin,
    )


def assert_one_error_line(result: subprocess.CompletedProcess[str], *fragments: str) -> str:
    """Exit code 2, and stderr ends in exactly one ``streamd: error:`` line containing ``fragments``."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("streamd: error:")]
    assert len(errors) == 1 and errors[0] == lines[-1] and ERROR_LINE.match(lines[-1]), result.stderr
    for fragment in fragments:
        assert fragment in lines[-1], (fragment, lines[-1])
    return lines[-1]


@pytest.fixture
def ctx() -> Iterator[zmq.Context[Any]]:
    context: zmq.Context[Any] = zmq.Context()
    yield context
    context.destroy(linger=0)


def bound(ctx: zmq.Context[Any], kind: int) -> tuple[zmq.Socket[Any], str]:
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    sock.bind(endpoint)
    return sock, endpoint


# environment variables and options ----------------------------------------------------


@pytest.mark.parametrize(
    ("command", "variable", "value"),
    [
        (["demo"], "STREAMD_DURATION", "abc"),
        (["demo"], "STREAMD_DURATION", "5s"),
        (["demo"], "STREAMD_DURATION", "inf"),
        (["demo"], "STREAMD_RATE", "-1"),
        (["demo"], "STREAMD_KEYS", "many"),
        (["run"], "STREAMD_WORKERS", "two"),
        (["run"], "STREAMD_WORKERS", "100000"),
        (["tail"], "STREAMD_COUNT", "x"),
        (["tail"], "STREAMD_TAIL_ENDPOINT", "localhost:5556"),
        (["replay", "ticks.csv"], "STREAMD_SPEED", "fast"),
        (["replay", "ticks.csv"], "STREAMD_BATCH", "0"),
        (["replay", "ticks.csv"], "STREAMD_REPLAY_ENDPOINT", "127.0.0.1:5555"),
    ],
)
def test_bad_environment_value_is_one_line_naming_the_variable(command: list[str], variable: str, value: str) -> None:
    """A bad STREAMD_* value stops only the command that reads it, with one line naming the variable."""
    assert_one_error_line(streamd(*command, env={variable: value}, timeout=20), f"{variable}: ")


def test_bad_environment_value_does_not_break_help_or_other_commands(tmp_path: Path) -> None:
    """STREAMD_DURATION=abc leaves --help and check-config working."""
    config = tmp_path / "c.toml"
    config.write_text("[log]\nlevel = 'info'\n")
    env = {"STREAMD_DURATION": "abc", "STREAMD_BATCH": "lots"}
    assert streamd("--help", env=env).returncode == 0
    assert streamd("demo", "--help", env=env).returncode == 0
    result = streamd("check-config", str(config), env=env)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (["demo", "--duration", "abc"], "--duration"),
        (["demo", "--rate", "0"], "--rate"),
        (["tail", "--count", "-1"], "--count"),
        (["replay", "x.csv", "--batch", "0"], "--batch"),
        (["replay", "x.csv", "--speed", "-2"], "--speed"),
        (["replay", "x.csv", "--endpoint", "localhost:5555"], "--endpoint"),
        (["run", "--workers", "-1"], "--workers"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_bad_option_is_one_line_naming_the_option(args: list[str], option: str) -> None:
    """argparse errors follow the same one-line convention and name the option."""
    assert_one_error_line(streamd(*args), option)


def test_retired_endpoint_variable_is_refused_by_tail_and_replay(tmp_path: Path) -> None:
    """STREAMD_ENDPOINT meant two different sockets; it is refused rather than guessed."""
    env = {"STREAMD_ENDPOINT": "tcp://127.0.0.1:5556"}
    assert_one_error_line(streamd("tail", env=env), "STREAMD_ENDPOINT", "STREAMD_TAIL_ENDPOINT")
    assert_one_error_line(streamd("replay", "x.csv", env=env), "STREAMD_ENDPOINT", "STREAMD_REPLAY_ENDPOINT")


# config files ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "env", "fragment"),
    [
        (["run"], {"STREAMD_CONFIG": ""}, "STREAMD_CONFIG: set but empty"),
        (["check-config"], {"STREAMD_CONFIG": ""}, "STREAMD_CONFIG: set but empty"),
        (["run", "--config", ""], {}, "argument --config: expected a file path"),
        (["check-config", ""], {}, "argument file: expected a file path"),
    ],
)
def test_empty_config_setting_is_an_error_not_the_built_in_config(
    args: list[str], env: dict[str, str], fragment: str
) -> None:
    """An empty STREAMD_CONFIG or --config "" (the unit's ${STREAMD_CONFIG} unset) never starts unconfigured."""
    assert_one_error_line(streamd(*args, env=env), fragment)


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n"])
def test_config_file_without_settings_is_an_error(tmp_path: Path, text: str) -> None:
    """An empty (or comment-only) config file is rejected by check-config and run alike."""
    config = tmp_path / "empty.toml"
    config.write_text(text)
    for args in (["check-config", str(config)], ["run", "--config", str(config)]):
        assert_one_error_line(streamd(*args), str(config), "no settings")


def test_config_file_not_in_utf8_is_one_line_with_the_line_number(tmp_path: Path) -> None:
    """A Latin-1 byte in a comment names the file and line instead of a UnicodeDecodeError."""
    config = tmp_path / "latin1.toml"
    config.write_bytes("[log]\n# caf\xe9\nlevel = 'info'\n".encode("latin-1"))
    assert_one_error_line(streamd("check-config", str(config)), f"{config}:2: not UTF-8 (byte 0xe9)")


@pytest.mark.parametrize(
    ("toml", "fragment"),
    [
        ("[ingest]\nrcvhwm = 99999999999999999999\n", "ingest.rcvhwm: must be <= 2147483647"),
        ("[publish]\nsndhwm = 2147483648\n", "publish.sndhwm: must be <= 2147483647"),
        ("[workers]\nqueue_batches = 3000000000\n", "workers.queue_batches: must be <= 2147483647"),
        (
            "[[signal]]\nname = 'x'\nwindow = 'time'\nsize = '99999999999999999999h'\n",
            "signal[0].size: duration must be at most 8760h",
        ),
    ],
)
def test_out_of_range_values_fail_check_config_and_run_alike(tmp_path: Path, toml: str, fragment: str) -> None:
    """What check-config accepts, run can use: values beyond a consumer's limit fail both, in one line."""
    config = tmp_path / "big.toml"
    config.write_text(toml)
    for args in (["check-config", str(config)], ["run", "--config", str(config)]):
        assert_one_error_line(streamd(*args), fragment)


# replay -------------------------------------------------------------------------------


def test_replay_to_a_port_where_nothing_listens_fails_within_the_send_timeout(tmp_path: Path) -> None:
    """With no receiver, replay says so and exits 2 after the send timeout instead of hanging."""
    csv_path = tmp_path / "ticks.csv"
    csv_path.write_text("k,t,p,q\n" + "".join(f"A,{i},1.0,1\n" for i in range(20)))
    started = time.monotonic()
    result = streamd("replay", str(csv_path), "--endpoint", f"tcp://127.0.0.1:{free_port()}", timeout=30)
    assert_one_error_line(result, "nothing received the ticks", "0 of 20 sent")
    assert "100.0%" not in result.stderr
    assert time.monotonic() - started < 20


def test_replay_refuses_a_publish_endpoint(tmp_path: Path, ctx: zmq.Context[Any]) -> None:
    """Pointed at a PUB-side socket (the output port), replay errors instead of delivering nothing."""
    _xpub, endpoint = bound(ctx, zmq.XPUB)
    csv_path = tmp_path / "ticks.csv"
    csv_path.write_text("k,t,p,q\nA,1,1.0,1\n")
    assert_one_error_line(streamd("replay", str(csv_path), "--endpoint", endpoint), "nothing received the ticks")


def _receive_ticks(sock: zmq.Socket[Any], expected: int, timeout: float) -> list[dict[str, list[Any]]]:
    """Columnar batches received until they hold ``expected`` ticks (or the timeout)."""
    batches: list[dict[str, list[Any]]] = []
    deadline = time.monotonic() + timeout
    while sum(len(b["t"]) for b in batches) < expected and time.monotonic() < deadline:
        if sock.poll(100):
            batches.append(msgpack.unpackb(sock.recv()))
    return batches


def test_replay_skips_counts_and_reports_bad_lines(tmp_path: Path, ctx: zmq.Context[Any]) -> None:
    """Bad lines are skipped with their line numbers (the first few), counted, and the rest is sent."""
    pull, endpoint = bound(ctx, zmq.PULL)
    lines = ["k,t,p,q"]
    good = 0
    for i in range(40):
        if i % 5 == 2:
            lines.append(f"B,{i},not-a-price,1")
        else:
            lines.append(f"A,{1000 + i},{i}.5,2")
            good += 1
    lines += ["C,99999999999999999999999,1.0,1", "D,5", "", ""]
    csv_path = tmp_path / "ticks.csv"
    csv_path.write_text("\n".join(lines) + "\n")
    collected: list[dict[str, list[Any]]] = []
    receiver = threading.Thread(target=lambda: collected.extend(_receive_ticks(pull, good, 20)))
    receiver.start()
    result = streamd("replay", str(csv_path), "--batch", "7", env={"STREAMD_REPLAY_ENDPOINT": endpoint})
    receiver.join(30)
    assert result.returncode == 0, result.stderr
    assert f"{csv_path}:4: skipped, p='not-a-price' is not a number" in result.stderr
    shown = re.findall(r"streamd: warning: .*:(\d+): skipped", result.stderr)
    assert shown == ["4", "9", "14", "19", "24"]
    assert "skipped 10 bad line(s)" in result.stderr
    assert "Traceback" not in result.stderr
    assert sum(len(batch["t"]) for batch in collected) == good
    assert {k for batch in collected for k in batch["k"]} == {"A"}


# tail ---------------------------------------------------------------------------------


def _publish_until(pub: zmq.Socket[Any], proc: subprocess.Popen[str], frames: list[bytes], timeout: float) -> None:
    """Send ``frames`` every 50 ms (a SUB joins late) until ``proc`` exits."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        pub.send_multipart(frames)
        time.sleep(0.05)


def _batch_message(rows: int) -> list[bytes]:
    payload = {"signal": "bm", "pub_ns": 1, "k": [f"K{i}" for i in range(rows)], "t": list(range(rows))}
    return [b"bm", msgpack.packb({**payload, "mean": [float(i) for i in range(rows)]})]


def test_tail_count_counts_rows_of_batch_mode_messages(ctx: zmq.Context[Any]) -> None:
    """--count 2 prints two rows even when one batch-mode message carries twenty."""
    pub, endpoint = bound(ctx, zmq.PUB)
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMD_")}
    command = [sys.executable, "-m", "streamd", "tail", "--count", "2"]
    with subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**env, "STREAMD_TAIL_ENDPOINT": endpoint},
    ) as proc:
        try:
            _publish_until(pub, proc, _batch_message(20), 20)
            out, err = proc.communicate(timeout=10)
        finally:
            proc.kill()
    assert proc.returncode == 0, err
    assert [json.loads(line)["k"] for line in out.splitlines()] == ["K0", "K1"]


def test_tail_into_a_closed_pipe_exits_quietly(ctx: zmq.Context[Any]) -> None:
    """`streamd tail | head -1`: when the reader goes away, tail exits 0 without a message."""
    pub, endpoint = bound(ctx, zmq.PUB)
    with subprocess.Popen(
        [sys.executable, "-m", "streamd", "tail", "--endpoint", endpoint],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        try:
            assert proc.stdout is not None
            reader = threading.Thread(target=proc.stdout.readline)
            reader.start()
            deadline = time.monotonic() + 20
            while reader.is_alive() and time.monotonic() < deadline:
                pub.send_multipart(_batch_message(3))
                reader.join(0.05)
            proc.stdout.close()
            _publish_until(pub, proc, _batch_message(3000), 20)
            err = proc.stderr.read() if proc.stderr else ""
            proc.wait(10)
        finally:
            proc.kill()
    assert proc.returncode == 0, err
    assert err == ""


# demo ---------------------------------------------------------------------------------

_DEMO_PORTS = (5555, 5556, 9108)


def _wait_for_free_demo_ports(timeout: float) -> None:
    """The demo binds the built-in ports; wait for any other run on this machine to release them."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            for port in _DEMO_PORTS:
                with socket.socket() as probe:
                    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as ZeroMQ binds
                    probe.bind(("127.0.0.1", port))
            return
        except OSError:
            time.sleep(0.5)


def test_ctrl_c_in_demo_stops_without_a_traceback() -> None:
    """Ctrl-C (SIGINT to the whole foreground group) ends the demo cleanly, feed process included."""
    _wait_for_free_demo_ports(60)
    with subprocess.Popen(
        [sys.executable, "-m", "streamd", "demo", "--rate", "2000", "--keys", "20"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    ) as proc:
        try:
            assert proc.stdout is not None
            deadline = time.monotonic() + 45
            while time.monotonic() < deadline and "px1s: count=" not in proc.stdout.readline():
                pass  # workers are up and signals flow: the steady state a user interrupts
            os.killpg(proc.pid, signal.SIGINT)
            _, err = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert proc.returncode == 0, err
