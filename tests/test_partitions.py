"""Partitions: FNV-1a-32 of a key's bytes mod n, the same as the NATS server's ``partition(n, ...)`` mapping."""

from __future__ import annotations

import asyncio
from pathlib import Path

import nats
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from nats.js.api import StreamConfig, SubjectTransform

from streamd.partitions import fnv1a32, partition_bytes, partition_for, partitions_for, split_by_partition
from tests.natscluster import nats_cluster

keys = st.one_of(st.text(max_size=40), st.integers(-(2**63), 2**63 - 1))


def test_fnv1a32_known_vectors() -> None:
    """The published FNV-1a 32-bit test vectors."""
    assert fnv1a32(b"") == 0x811C9DC5
    assert fnv1a32(b"a") == 0xE40C292C
    assert fnv1a32(b"foobar") == 0xBF9CF968


def test_integer_keys_hash_their_decimal_digits() -> None:
    """An integer key is partitioned as the subject token that spells it."""
    assert partition_bytes(-5) == b"-5"
    assert partition_for(5, 64) == partition_for("5", 64)
    assert partition_bytes("é") == "é".encode()


@given(st.lists(keys, max_size=60), st.integers(1, 4096))
def test_vectorised_partitions_equal_the_scalar_function(batch: list[str | int], partitions: int) -> None:
    """partitions_for hashes many keys at once and agrees key by key with partition_for."""
    expected = [partition_for(key, partitions) for key in batch]
    assert partitions_for(batch, partitions).tolist() == expected


def test_split_by_partition_keeps_arrival_order() -> None:
    """Each partition gets its ticks in the order they came."""
    part = np.array([3, 1, 3, 0, 1, 3])
    t = np.arange(6) * 10
    p = np.arange(6) + 0.5
    split = split_by_partition(part, t, p)
    assert sorted(split) == [0, 1, 3]
    assert split[3][0].tolist() == [0, 20, 50]
    assert split[1][1].tolist() == [1.5, 4.5]
    assert split_by_partition(np.zeros(0, np.int64), t[:0]) == {}


async def _server_partitions(url: str, tokens: list[str], partitions: int) -> dict[str, int]:
    """Publish one message per token on ``keys.<token>``; read back which partition subject the server chose."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        transform = SubjectTransform(src="keys.*", dest=f"part.{{{{partition({partitions},1)}}}}.{{{{wildcard(1)}}}}")
        await js.add_stream(StreamConfig(name="mapping", subjects=["keys.*"], subject_transform=transform))
        for token in tokens:
            await js.publish(f"keys.{token}", b"")
        landed = {}
        for seq in range(1, len(tokens) + 1):
            message = await js.get_msg("mapping", seq)
            _, part, token = (message.subject or "").split(".", 2)
            landed[token] = int(part)
        return landed
    finally:
        await nc.close()


@pytest.mark.cluster  # starts a nats-server: run alone (Makefile)
@pytest.mark.timeout(60)
def test_agrees_with_the_servers_partition_mapping(tmp_path: Path) -> None:
    """A few hundred keys land on the same partition in nats-server's subject mapping as in partition_for."""
    rng = np.random.default_rng(7)
    alphabet = list("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
    tokens = sorted({"".join(rng.choice(alphabet, rng.integers(1, 24))) for _ in range(300)})
    tokens += ["é", "ключ", "12345", "-7"]
    with nats_cluster(tmp_path, size=1) as cluster:
        for partitions in (64, 7):
            landed = asyncio.run(asyncio.wait_for(_server_partitions(cluster.urls[0], tokens, partitions), 30))
            assert landed == {token: partition_for(token, partitions) for token in tokens}
            assert [partition_for(int(t), partitions) for t in ("12345", "-7")] == [landed["12345"], landed["-7"]]
            asyncio.run(asyncio.wait_for(_drop_stream(cluster.urls[0]), 10))


async def _drop_stream(url: str) -> None:
    nc = await nats.connect(url)
    try:
        await nc.jetstream().delete_stream("mapping")
    finally:
        await nc.close()
