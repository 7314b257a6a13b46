"""Bad input never stops the daemon, is counted by reason, and every tick is accounted for."""

from __future__ import annotations

from pathlib import Path

import msgpack

from tests.helpers import Subscriber, accounting, feed, make_ticks, running_daemon


def test_bad_input_is_counted_by_reason_and_accounted(tmp_path: Path) -> None:
    """Malformed frames, bad ticks and late ticks land in the right counters; identity holds."""
    base = 1_700_000_000_000_000_000
    payloads = [
        b"\xc1",  # never valid msgpack
        msgpack.packb("just a string"),
        msgpack.packb({"k": ["a", "b"], "t": [1], "p": [1.0, 2.0]}),  # unequal columns
        msgpack.packb({"k": "A", "t": base + 10, "p": "x"}),
        msgpack.packb({"k": "A", "t": 1.5, "p": 1.0}),
        msgpack.packb({"k": 3.5, "t": base, "p": 1.0}),
        msgpack.packb({"k": "A", "t": base + 10, "p": 1.0, "q": -1}),
        msgpack.packb({"k": "A", "t": base + 10, "p": float("inf")}),
        msgpack.packb([{"k": "A", "t": base + 20, "p": 2.0}, "not a tick", {"k": "A", "t": base + 5, "p": 3.0}]),
    ]
    with running_daemon(tmp_path, workers=2) as daemon:
        sub = Subscriber(daemon)
        sub.sync()
        feed(daemon.ingest, payloads)
        good = make_ticks(1000, keys=10, seed=9)
        feed(daemon.ingest, [msgpack.packb(good)])
        sub.collect(lambda: {r["k"] for r in sub.records} >= {x["k"] for x in good})
        sub.close()
        samples = daemon.wait_idle()
        log = daemon.log()
    dropped = {k: v for k, v in samples.items() if k.startswith("streamd_ticks_dropped_total{")}
    assert dropped['streamd_ticks_dropped_total{reason="bad_price"}'] == 2
    assert dropped['streamd_ticks_dropped_total{reason="bad_time"}'] == 1
    assert dropped['streamd_ticks_dropped_total{reason="bad_key"}'] == 1
    assert dropped['streamd_ticks_dropped_total{reason="bad_qty"}'] == 1
    assert dropped['streamd_ticks_dropped_total{reason="bad_tick"}'] == 1
    assert dropped['streamd_ticks_dropped_total{reason="late"}'] == 1
    messages = {k: v for k, v in samples.items() if k.startswith("streamd_ingest_messages_dropped_total{")}
    assert messages['streamd_ingest_messages_dropped_total{reason="malformed"}'] == 1
    assert messages['streamd_ingest_messages_dropped_total{reason="bad_shape"}'] == 2
    assert accounting(samples) == 0
    assert "input dropped" in log and "bad_price" in log
    assert "Traceback" not in log
