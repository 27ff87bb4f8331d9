"""Blobs (model/blobs.py, contract/blobs.py): the folder and the Redis store keep the same contract;
Redis values are chunked, replaced whole, and missing when any part of them was evicted."""

from __future__ import annotations

import pytest
import redis

from conftest import CACHE_PORT, RECORDS_PORT
from contract.blobs import RedisBlobs
from model.blobs import BlobError, Folder

DB = 10


@pytest.fixture(params=["folder", "redis"])
def blobs(request, tmp_path, redis_servers):
    if request.param == "folder":
        yield Folder(tmp_path / "store")
        return
    r = redis.Redis(port=RECORDS_PORT, db=DB)
    r.flushdb()
    yield RedisBlobs(r, chunk_bytes=1000)
    r.flushdb()


def test_put_get_create_delete_and_keys_alike_in_a_folder_and_in_redis(blobs):
    data = bytes(range(256)) * 20  # 5120 bytes: six chunks of 1000 in Redis
    assert blobs.get("a/b.bin") is None
    blobs.put("a/b.bin", data)
    assert blobs.get("a/b.bin") == data
    blobs.put("a/b.bin", b"second")  # replaced whole
    assert blobs.get("a/b.bin") == b"second"
    assert blobs.create("a/lock", b"1") and not blobs.create("a/lock", b"2")  # one caller wins
    assert blobs.get("a/lock") == b"1"
    blobs.put("a/c/d.json", b"{}")
    blobs.put("ab.txt", b"")
    assert blobs.keys("a/") == ["a/b.bin", "a/c/d.json", "a/lock"]
    assert blobs.get("ab.txt") == b""
    sub = blobs.under("a")
    assert sub.get("c/d.json") == b"{}" and sub.keys("c/") == ["c/d.json"]
    blobs.delete("a/b.bin")
    assert blobs.get("a/b.bin") is None and "a/b.bin" not in blobs.keys()
    for bad in ("../x", "/etc/passwd", "a//b", "a/../b", ""):
        with pytest.raises(BlobError):
            blobs.get(bad)


def test_redis_values_are_chunked_and_a_replace_leaves_no_old_chunk(redis_servers):
    r = redis.Redis(port=RECORDS_PORT, db=DB)
    r.flushdb()
    try:
        store = RedisBlobs(r, prefix="t:", chunk_bytes=100)
        store.put("k", b"x" * 950)
        assert len(r.keys("t:k@*")) == 10 and store.size("k") == 950
        store.put("k", b"y" * 150)
        assert len(r.keys("t:k@*")) == 2 and store.get("k") == b"y" * 150
        store.delete("k")
        assert r.keys("t:*") == [b"t:index"] or r.keys("t:*") == []
    finally:
        r.flushdb()


def test_a_value_missing_a_chunk_is_missing_and_values_expire_with_their_ttl(redis_servers):
    """On the LRU cache a chunk may be evicted alone: the value reads as gone (adapted again), never as
    a shorter one."""
    r = redis.Redis(port=CACHE_PORT, db=DB)
    r.flushdb()
    try:
        cache = RedisBlobs(r, prefix="w:", chunk_bytes=100, ttl_s=60, indexed=False)
        cache.put("weights/x", b"z" * 300)
        assert 0 < r.ttl("w:weights/x") <= 60 and all(0 < r.ttl(k) <= 60 for k in r.keys("w:weights/x@*"))
        r.delete(sorted(r.keys("w:weights/x@*"))[1])
        assert cache.get("weights/x") is None
        with pytest.raises(TypeError):
            cache.keys()
    finally:
        r.flushdb()
