"""Configuration: typed, frozen, validated at load, errors name the key."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from streamd.config import (
    MAX_BATCH_SIZE,
    MAX_COUNT_WINDOW,
    MAX_DURATION_NS,
    MAX_HWM,
    MAX_WORKERS,
    Config,
    ConfigError,
    config_from_mapping,
    load_config,
    parse_duration,
    with_overrides,
)


@pytest.mark.parametrize(
    ("text", "nanos"),
    [
        ("500us", 500_000),
        ("250ms", 250_000_000),
        ("1s", 1_000_000_000),
        ("5m", 300_000_000_000),
        ("1.5s", 1_500_000_000),
    ],
)
def test_durations_parse_to_nanoseconds(text: str, nanos: int) -> None:
    """Durations in the documented units become integer nanoseconds."""
    assert parse_duration(text, "k") == nanos


@pytest.mark.parametrize("bad", ["1", "1 fortnight", "-1s", "0s", 5, True, ""])
def test_bad_durations_name_the_key(bad: object) -> None:
    """A bad duration is rejected with the key's name."""
    with pytest.raises(ConfigError, match=r"^latency\.max_batch_delay: "):
        config_from_mapping({"latency": {"max_batch_delay": bad}})


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"nope": {}}, "nope: unknown key"),
        ({"ingest": {"mode": "push"}}, "ingest.mode: must be one of"),
        ({"ingest": {"endpoints": "tcp://x:1"}}, "ingest.endpoints: expected a list"),
        ({"ingest": {"endpoints": ["localhost:1"]}}, "ingest.endpoints[0]: bad endpoint"),
        ({"workers": {"count": "2"}}, "workers.count: expected an integer"),
        ({"workers": {"count": -1}}, "workers.count: must be >= 0"),
        ({"metrics": {"listen": "9108"}}, "metrics.listen: expected 'host:port'"),
        ({"signal": [{"name": "a b", "window": "time", "size": "1s"}]}, "signal[0].name"),
        ({"signal": [{"name": "a", "window": "tumbling", "size": "1s"}]}, "signal[0].window"),
        ({"signal": [{"name": "a", "window": "count", "size": "1s"}]}, "signal[0].size: expected an integer"),
        ({"signal": [{"name": "a", "window": "time", "size": "1s", "stats": ["ewma"]}]}, "signal[0].stats[0]"),
        ({"signal": [{"name": "a", "window": "ewma", "size": "1s", "stats": ["mean"]}]}, "signal[0].stats[0]"),
        ({"signal": [{"name": "a", "window": "time", "size": "1s", "colour": 1}]}, "signal[0].colour: unknown key"),
        ({"signal": [{"name": "a", "window": "time"}]}, "signal[0].size: required"),
        (
            {"signal": [{"name": "a", "window": "time", "size": "1s"}, {"name": "a", "window": "count", "size": 2}]},
            "signal[1].name: duplicate",
        ),
        ({"signal": [{"name": "a", "window": "time", "size": "1s", "publish": "stream"}]}, "signal[0].publish"),
    ],
)
def test_wrong_values_are_rejected_with_the_key_name(raw: dict[str, object], key: str) -> None:
    """Unknown keys, wrong types and bad choices name the key."""
    with pytest.raises(ConfigError) as info:
        config_from_mapping(raw)
    assert str(info.value).startswith(key)


def test_config_is_frozen_and_defaults_are_documented_values() -> None:
    """The config object cannot be mutated and defaults match the README."""
    config = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.ingest = config.ingest  # type: ignore[misc]
    assert config.ingest.endpoints == ("tcp://127.0.0.1:5555",)
    assert config.publish.endpoint == "tcp://127.0.0.1:5556"
    assert config.metrics.listen == "127.0.0.1:9108"
    assert config.latency.max_batch_delay_ns == 1_000_000
    assert [s.name for s in config.signals] == ["px1s", "mean100", "ewma1s"]


def test_signal_table_builds_specs(tmp_path: Path) -> None:
    """A [[signal]] table becomes a SignalSpec with sizes in ns or ticks."""
    path = tmp_path / "c.toml"
    path.write_text(
        '[[signal]]\nname = "px1s"\nwindow = "time"\nsize = "1s"\nstats = ["count", "mean"]\nemit_interval = "100ms"\n'
        '[[signal]]\nname = "c"\nwindow = "count"\nsize = 100\nstats = ["std"]\npublish = "batch"\n'
    )
    first, second = load_config(path).signals
    assert (first.window, first.size, first.stats, first.emit_interval_ns) == ("time", 10**9, ("count", "mean"), 10**8)
    assert (second.window, second.size, second.publish) == ("count", 100, "batch")


def test_unreadable_and_invalid_toml_files_are_config_errors(tmp_path: Path) -> None:
    """Missing files and TOML syntax errors are ConfigErrors, not tracebacks."""
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("[ingest\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(broken)


def test_workers_override_and_digest_changes_with_config() -> None:
    """--workers overrides the file, and the config hash reflects it."""
    config = Config()
    changed = with_overrides(config, workers=3)
    assert changed.workers.count == 3
    assert changed.digest() != config.digest()
    assert with_overrides(config, workers=None) is config


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"ingest": {"rcvhwm": 2**31}}, "ingest.rcvhwm: must be <= 2147483647"),
        ({"ingest": {"rcvhwm": 10**20}}, "ingest.rcvhwm: must be <= 2147483647"),
        ({"publish": {"sndhwm": 2**31}}, "publish.sndhwm: must be <= 2147483647"),
        ({"workers": {"queue_batches": 2**31}}, "workers.queue_batches: must be <= 2147483647"),
        ({"workers": {"queue_batches": 0}}, "workers.queue_batches: must be >= 1"),
        ({"workers": {"count": MAX_WORKERS + 1}}, f"workers.count: must be <= {MAX_WORKERS}"),
        ({"latency": {"max_batch_size": MAX_BATCH_SIZE + 1}}, f"latency.max_batch_size: must be <= {MAX_BATCH_SIZE}"),
        ({"latency": {"max_batch_size": 0}}, "latency.max_batch_size: must be >= 1"),
        (
            {"signal": [{"name": "c", "window": "count", "size": MAX_COUNT_WINDOW + 1}]},
            f"signal[0].size: must be <= {MAX_COUNT_WINDOW}",
        ),
        ({"log": {"rate_limit_per_s": float("nan")}}, "log.rate_limit_per_s: must be between 1 and"),
        ({"log": {"rate_limit_per_s": float("inf")}}, "log.rate_limit_per_s: must be between 1 and"),
        ({"log": {"rate_limit_per_s": 0.5}}, "log.rate_limit_per_s: must be between 1 and"),
        ({"shutdown": {"graceful_timeout": "8761h"}}, "shutdown.graceful_timeout: duration must be at most 8760h"),
        ({"latency": {"max_batch_delay": "99999999999999999999h"}}, "latency.max_batch_delay: duration must be at"),
        (
            {"signal": [{"name": "t", "window": "time", "size": "10000000000000000000ns"}]},
            "signal[0].size: duration must be at most 8760h",
        ),
        ({"signal": [{"name": "e", "window": "ewma", "size": "1s", "emit_interval": "9000h"}]}, "signal[0].emit_int"),
    ],
)
def test_values_beyond_what_their_consumer_takes_are_rejected(raw: dict[str, object], key: str) -> None:
    """HWMs fit a C int, counts stay sane and durations stay within a year (so t - size fits int64)."""
    with pytest.raises(ConfigError) as info:
        config_from_mapping(raw)
    assert str(info.value).startswith(key), str(info.value)


def test_the_largest_accepted_values_build() -> None:
    """Each bound itself is accepted: the limits are inclusive, as documented."""
    config = config_from_mapping(
        {
            "ingest": {"rcvhwm": MAX_HWM},
            "publish": {"sndhwm": MAX_HWM},
            "workers": {"count": MAX_WORKERS, "queue_batches": MAX_HWM},
            "latency": {"max_batch_size": MAX_BATCH_SIZE, "max_batch_delay": "8760h"},
            "signal": [
                {"name": "c", "window": "count", "size": MAX_COUNT_WINDOW},
                {"name": "t", "window": "time", "size": "8760h"},
            ],
        }
    )
    assert config.signals[1].size == MAX_DURATION_NS < 2**63 - 2**62
    assert config.ingest.rcvhwm == 2**31 - 1


def test_decimal_durations_are_exact() -> None:
    """Fractional durations are converted exactly, even past float64's 2**53."""
    assert parse_duration("0.1s", "k") == 100_000_000
    assert parse_duration("2.675ms", "k") == 2_675_000
    assert parse_duration("9007199.254740993s", "k") == 2**53 + 1


def test_file_not_in_utf8_names_the_line(tmp_path: Path) -> None:
    """A Latin-1 byte is a ConfigError with the file, line and byte, not a UnicodeDecodeError."""
    path = tmp_path / "latin1.toml"
    path.write_bytes(b"[log]\n\n# caf\xe9\n")
    with pytest.raises(ConfigError, match=r"latin1\.toml:3: not UTF-8 \(byte 0xe9\)"):
        load_config(path)


@pytest.mark.parametrize("text", ["", "   \n", "# nothing here yet\n"])
def test_file_without_settings_is_rejected(tmp_path: Path, text: str) -> None:
    """An empty file is not taken as 'use the built-in config'."""
    path = tmp_path / "empty.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="no settings at all"):
        load_config(path)


def test_workers_override_is_bounded() -> None:
    """--workers obeys the same bounds as workers.count."""
    with pytest.raises(ConfigError, match="--workers: must be between 0 and"):
        with_overrides(Config(), workers=MAX_WORKERS + 1)


class TestState:
    def test_defaults_are_one_hour_and_a_million_keys(self) -> None:
        """[state] defaults: keys silent for an hour are evicted, a million keys per daemon."""
        state = Config().state
        assert (state.key_ttl_ns, state.max_keys) == (3_600_000_000_000, 1_000_000)
        assert state.max_keys_per_ingest(3) == 333_334

    @pytest.mark.parametrize(("text", "nanos"), [("300ms", 300_000_000), ("10s", 10_000_000_000), ("0", 0)])
    def test_key_ttl_is_a_duration_or_zero_for_never(self, text: str, nanos: int) -> None:
        """key_ttl takes a duration; "0" turns eviction off."""
        assert config_from_mapping({"state": {"key_ttl": text}}).state.key_ttl_ns == nanos

    @pytest.mark.parametrize(
        ("raw", "key"),
        [
            ({"key_ttl": 0}, "state.key_ttl: expected a duration"),
            ({"key_ttl": "1ms"}, "state.key_ttl: must be at least 10ms"),
            ({"key_ttl": "-1s"}, "state.key_ttl: bad duration"),
            ({"max_keys": -1}, "state.max_keys: must be >= 0"),
            ({"max_keys": "1M"}, "state.max_keys: expected an integer"),
            ({"max_keys": 2**41}, "state.max_keys: must be <="),
            ({"keys": 5}, "state.keys: unknown key"),
        ],
    )
    def test_bad_values_name_the_key(self, raw: dict[str, object], key: str) -> None:
        """Wrong types and out-of-range values of [state] are rejected with the key's name."""
        with pytest.raises(ConfigError) as info:
            config_from_mapping({"state": raw})
        assert str(info.value).startswith(key)

    def test_no_limit(self) -> None:
        """max_keys = 0 is no limit, for every ingest."""
        assert config_from_mapping({"state": {"max_keys": 0}}).state.max_keys_per_ingest(4) == 0
