"""The ``streamd`` command line: parses arguments and dispatches, nothing else.

Every option can also come from a ``STREAMD_*`` environment variable (for systemd's
``EnvironmentFile=``); the command line wins. ``OPTIONS`` lists them, and README.md
documents the same list. A user error, whether in an option, a variable or the config file,
ends with one ``streamd: error: ...`` line naming it and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NoReturn

import zmq

from streamd import __version__
from streamd.config import MAX_BATCH_SIZE, MAX_WORKERS, ConfigError, endpoint_problem, load_config, with_overrides
from streamd.keys import KeyFileError, read_authorized_keys
from streamd.replay import ReplayError
from streamd.runtime import StartupError

EXIT_USAGE = 2


def _int_between(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            number = int(text)
        except ValueError:
            msg = f"expected a whole number, got {text!r}"
            raise argparse.ArgumentTypeError(msg) from None
        if not low <= number <= high:
            msg = f"must be between {low} and {high}, got {number}"
            raise argparse.ArgumentTypeError(msg)
        return number

    return parse


def _non_negative_number(what: str) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            number = float(text)
        except ValueError:
            msg = f"expected {what}, got {text!r}"
            raise argparse.ArgumentTypeError(msg) from None
        if not (math.isfinite(number) and number >= 0):
            msg = f"expected {what} (finite, >= 0), got {text!r}"
            raise argparse.ArgumentTypeError(msg)
        return number

    return parse


def _file_path(text: str) -> str:
    if not text:
        msg = "expected a file path, got an empty string"
        raise argparse.ArgumentTypeError(msg)
    return text


def _endpoint(text: str) -> str:
    problem = endpoint_problem(text)
    if problem is not None:
        raise argparse.ArgumentTypeError(problem)
    return text


def _text(text: str) -> str:
    return text


@dataclass(frozen=True)
class Option:
    """One option of one command, and the variable that supplies it when it is not given."""

    name: str  # "--rate", or "file" for an optional positional argument
    variable: str
    parse: Callable[[str], object]
    default: object
    help: str

    @property
    def dest(self) -> str:
        return self.name.lstrip("-")


OPTIONS: dict[str, tuple[Option, ...]] = {
    "run": (
        Option("--config", "STREAMD_CONFIG", _file_path, None, "TOML config file; none = the built-in config"),
        Option("--workers", "STREAMD_WORKERS", _int_between(0, MAX_WORKERS), None, "workers, 0 = one per core"),
    ),
    "check-config": (Option("file", "STREAMD_CONFIG", _file_path, None, "TOML config file"),),
    "gateway": (Option("--config", "STREAMD_CONFIG", _file_path, None, "TOML config file with a [gateway] section"),),
    "demo": (
        Option(
            "--duration",
            "STREAMD_DURATION",
            _non_negative_number("a number of seconds, e.g. 30 or 2.5"),
            0.0,
            "seconds, 0 = until Ctrl-C",
        ),
        Option("--rate", "STREAMD_RATE", _int_between(1, 10_000_000), 20_000, "synthetic ticks per second"),
        Option("--keys", "STREAMD_KEYS", _int_between(1, 1_000_000), 300, "synthetic keys"),
    ),
    "tail": (
        Option("--endpoint", "STREAMD_TAIL_ENDPOINT", _endpoint, "tcp://127.0.0.1:5556", "the publish.endpoint"),
        Option("--signal", "STREAMD_SIGNAL", _text, None, "only this signal"),
        Option("--key", "STREAMD_KEY", _text, None, "only this key"),
        Option("--count", "STREAMD_COUNT", _int_between(0, 2**63 - 1), 0, "stop after this many rows, 0 = never"),
    ),
    "keygen": (
        Option("dir", "STREAMD_KEYGEN_DIR", _file_path, None, "directory to write NAME.key and NAME.key_secret in"),
        Option("--name", "STREAMD_KEYGEN_NAME", _text, "server", "file name of the keypair"),
    ),
    "replay": (
        Option("--endpoint", "STREAMD_REPLAY_ENDPOINT", _endpoint, "tcp://127.0.0.1:5555", "an ingest endpoint"),
        Option(
            "--speed",
            "STREAMD_SPEED",
            _non_negative_number("a speed-up factor, e.g. 10"),
            0.0,
            "event-time speed-up, 0 = max",
        ),
        Option("--batch", "STREAMD_BATCH", _int_between(1, MAX_BATCH_SIZE), 1000, "ticks per columnar message"),
    ),
}
# Once meant the publish endpoint to tail and the ingest endpoint to replay: refused, not guessed.
_RETIRED_ENDPOINT = "STREAMD_ENDPOINT"


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is the same one line as every other user error."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"streamd: error: {message} (see '{self.prog} --help')\n")


_COMMAND_HELP = {
    "run": "run the daemon",
    "check-config": "validate a config file",
    "gateway": "merge every cluster instance's signals onto one endpoint",
    "demo": "run on the built-in config with a synthetic feed, printing signals",
    "tail": "print signals from a running daemon",
    "keygen": "write a CURVE keypair (NAME.key public, NAME.key_secret private, 0600)",
    "replay": "publish ticks from a CSV file (k,t,p,q header)",
}


def _parser() -> _Parser:
    parser = _Parser(prog="streamd", description="Real-time stream analytics daemon.")
    parser.add_argument("--version", action="version", version=f"streamd {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    for command, options in OPTIONS.items():
        sub = commands.add_parser(command, help=_COMMAND_HELP[command])
        if command == "replay":
            sub.add_argument("file", help="CSV file with the header k,t,p,q")
        for option in options:
            shown = "" if option.default is None else f", default {option.default}"
            text = f"{option.help} ({option.variable}{shown})"
            if option.name.startswith("--"):
                sub.add_argument(option.name, type=option.parse, default=None, help=text)
            else:
                sub.add_argument(option.name, nargs="?", type=option.parse, default=None, help=text)
    return parser


def _from_environment(args: argparse.Namespace) -> None:
    """Fill every option left off the command line from its variable, else from its default."""
    for option in OPTIONS[args.command]:
        if getattr(args, option.dest) is not None:
            continue
        if option.dest == "endpoint" and _RETIRED_ENDPOINT in os.environ:
            msg = f"{_RETIRED_ENDPOINT}: no longer read (it meant two different sockets); set {option.variable}"
            raise ConfigError(msg)
        text = os.environ.get(option.variable)
        if text is None:
            setattr(args, option.dest, option.default)
        elif not text:
            msg = f"{option.variable}: set but empty; give it a value or unset it"
            raise ConfigError(msg)
        else:
            try:
                setattr(args, option.dest, option.parse(text))
            except argparse.ArgumentTypeError as exc:
                msg = f"{option.variable}: {exc}"
                raise ConfigError(msg) from None


def _run(args: argparse.Namespace) -> int:
    from streamd.config import Config
    from streamd.supervisor import Supervisor

    config = Config() if args.config is None else load_config(args.config)
    return Supervisor(with_overrides(config, workers=args.workers), args.config).run()


def _check(args: argparse.Namespace) -> int:
    if args.file is None:
        msg = "check-config: give a config file (or set STREAMD_CONFIG)"
        raise ConfigError(msg)
    config = load_config(args.file)
    names = ", ".join(s.name for s in config.signals)
    curve = ""
    if config.security is not None:
        curve = f"; CURVE on, {len(read_authorized_keys(config.security.curve_authorized_keys))} authorized keys"
    print(f"{args.file}: OK ({len(config.signals)} signals: {names}{curve}; config hash {config.digest()})")
    return 0


def _gateway(args: argparse.Namespace) -> int:
    from streamd.gateway import run_gateway

    if args.config is None:
        msg = "gateway: give --config FILE (or set STREAMD_CONFIG) with a [gateway] section"
        raise ConfigError(msg)
    return run_gateway(load_config(args.config))


def _demo(args: argparse.Namespace) -> int:
    from streamd.demo import run_demo

    return run_demo(duration=args.duration, rate=args.rate, keys=args.keys)


def _tail(args: argparse.Namespace) -> int:
    from streamd.tail import tail

    return tail(args.endpoint, signal=args.signal, key=args.key, count=args.count)


def _keygen(args: argparse.Namespace) -> int:
    from streamd.keys import read_public_key, write_keypair

    if args.dir is None:
        msg = "keygen: give a directory (or set STREAMD_KEYGEN_DIR)"
        raise ConfigError(msg)
    public, secret = write_keypair(args.dir, args.name)
    print(f"{public}: public key {read_public_key(public).decode()} (give it out; mode 0644)")
    print(f"{secret}: secret key (keep it private; mode 0600)")
    return 0


def _replay(args: argparse.Namespace) -> int:
    from streamd.replay import replay

    return replay(args.file, args.endpoint, speed=args.speed, batch=args.batch)


COMMANDS = {
    "run": _run,
    "check-config": _check,
    "gateway": _gateway,
    "demo": _demo,
    "tail": _tail,
    "keygen": _keygen,
    "replay": _replay,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        _from_environment(args)
        return COMMANDS[args.command](args)
    except (ConfigError, KeyFileError, StartupError, ReplayError, zmq.ZMQError, OSError) as exc:
        print(f"streamd: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
