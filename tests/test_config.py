"""Configuration: typed, frozen, validated at load, errors name the key."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from streamd.config import Config, ConfigError, config_from_mapping, load_config, parse_duration, with_overrides


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
