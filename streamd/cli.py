"""The ``streamd`` command line: parses arguments and dispatches, nothing else.

Every option can also come from a ``STREAMD_*`` environment variable (for systemd's
``EnvironmentFile=``): ``STREAMD_CONFIG``, ``STREAMD_WORKERS``, ``STREAMD_ENDPOINT``...
A user error ends with one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import zmq

from streamd import __version__
from streamd.config import ConfigError, load_config, with_overrides
from streamd.runtime import StartupError

EXIT_USAGE = 2


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(f"STREAMD_{name}", default)


def _env_int(name: str) -> int | None:
    value = _env(name)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        msg = f"STREAMD_{name}: expected an integer, got {value!r}"
        raise ConfigError(msg) from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="streamd", description="Real-time stream analytics daemon.")
    parser.add_argument("--version", action="version", version=f"streamd {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run the daemon")
    run.add_argument("--config", default=_env("CONFIG"), help="TOML config file (STREAMD_CONFIG)")
    run.add_argument("--workers", type=int, default=None, help="worker processes, 0 = one per core (STREAMD_WORKERS)")

    check = commands.add_parser("check-config", help="validate a config file")
    check.add_argument("file", nargs="?", default=_env("CONFIG"))

    demo = commands.add_parser("demo", help="run on the built-in config with a synthetic feed, printing signals")
    demo.add_argument(
        "--duration", type=float, default=float(_env("DURATION", "0") or 0), help="seconds, 0 = until Ctrl-C"
    )
    demo.add_argument("--rate", type=int, default=20_000, help="synthetic ticks per second")
    demo.add_argument("--keys", type=int, default=300, help="synthetic keys")

    tail = commands.add_parser("tail", help="print signals from a running daemon")
    tail.add_argument("--endpoint", default=_env("ENDPOINT", "tcp://127.0.0.1:5556"))
    tail.add_argument("--signal", default=_env("SIGNAL"))
    tail.add_argument("--key", default=_env("KEY"))
    tail.add_argument("--count", type=int, default=0, help="stop after this many rows (0 = never)")

    replay = commands.add_parser("replay", help="publish ticks from a CSV file (k,t,p,q header)")
    replay.add_argument("file")
    replay.add_argument("--endpoint", default=_env("ENDPOINT", "tcp://127.0.0.1:5555"))
    replay.add_argument("--speed", type=float, default=0.0, help="event-time speed-up, 0 = as fast as possible")
    replay.add_argument("--batch", type=int, default=1000, help="ticks per columnar message")
    return parser


def _run(args: argparse.Namespace) -> int:
    from streamd.config import Config
    from streamd.supervisor import Supervisor

    config = load_config(args.config) if args.config else Config()
    workers = args.workers if args.workers is not None else _env_int("WORKERS")
    return Supervisor(with_overrides(config, workers=workers), args.config).run()


def _check(args: argparse.Namespace) -> int:
    if not args.file:
        msg = "check-config: give a config file (or set STREAMD_CONFIG)"
        raise ConfigError(msg)
    config = load_config(args.file)
    names = ", ".join(s.name for s in config.signals)
    print(f"{args.file}: OK ({len(config.signals)} signals: {names}; config hash {config.digest()})")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from streamd.demo import run_demo

    return run_demo(duration=args.duration, rate=args.rate, keys=args.keys)


def _tail(args: argparse.Namespace) -> int:
    from streamd.tail import tail

    return tail(args.endpoint, signal=args.signal, key=args.key, count=args.count)


def _replay(args: argparse.Namespace) -> int:
    from streamd.replay import replay

    return replay(args.file, args.endpoint, speed=args.speed, batch=args.batch)


COMMANDS = {"run": _run, "check-config": _check, "demo": _demo, "tail": _tail, "replay": _replay}


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (ConfigError, StartupError, zmq.ZMQError, OSError) as exc:
        print(f"streamd: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
