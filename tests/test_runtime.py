"""Process set-up helpers shared by the ingest and worker processes."""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

import pytest
import zmq

from streamd.runtime import zmq_context_that_sends_in_bursts


def thread_policies() -> dict[int, tuple[str, int]]:
    """Thread id -> name and scheduling policy (field 41 of /proc/self/task/TID/stat) of this process's threads."""
    policies = {}
    for task in Path("/proc/self/task").iterdir():
        fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        policies[int(task.name)] = ((task / "comm").read_text().strip(), int(fields[38]))
    return policies


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SCHED_BATCH and /proc are Linux's")
def test_the_io_threads_of_a_bursting_context_are_sched_batch() -> None:
    """The context's I/O threads, started by its first socket, run under SCHED_BATCH; this thread does not."""
    before = thread_policies()
    ctx = zmq_context_that_sends_in_bursts()
    sock = ctx.socket(zmq.PUSH)
    try:
        started = {name: policy for tid, (name, policy) in thread_policies().items() if tid not in before}
    finally:
        sock.close(0)
        ctx.term()
    zeromq = {name: policy for name, policy in started.items() if name.startswith("ZMQbg")}  # libzmq's names
    assert zeromq
    assert set(zeromq.values()) == {os.SCHED_BATCH}
    assert thread_policies()[threading.get_native_id()][1] == os.SCHED_OTHER
