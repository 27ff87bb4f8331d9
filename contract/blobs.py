"""Blobs in Redis (model.blobs.Blobs): what any machine of the service reaches, with no shared disk.

A value is a head hash {v, n, size, sha256} and n chunks of at most chunk_bytes under
`<prefix><key>@<v>#<i>`: a Redis string holds at most 512 MB (a full-mode SmolLM2 task is ~540
MB), and one large value would block Redis while it is copied. A put writes the chunks of a new
version first and then swaps the head in one script, which deletes the old chunks: a reader sees
the old value or the new one. On an LRU Redis (the weights cache) a head or a chunk may be
evicted alone: get checks the count and the sha256 and answers None, so the caller adapts again.

Durable stores (the records Redis: checkpoints, the bank, imported adapters) keep an index of
their keys for listing; the weights cache has none (its values expire and are evicted).
"""

from __future__ import annotations

import hashlib
import uuid
from functools import lru_cache

import redis

from model.blobs import Blobs, check_key
from model.settings import Settings

# Swap the head to a new version; delete the old version's chunks. KEYS: head, index ('' for none).
# ARGV: v, n, size, sha256, ttl (0: none), only_if_absent (1/0). Returns 1, or 0 when it existed.
_SWAP = """
local old = redis.call('HMGET', KEYS[1], 'v', 'n')
if ARGV[6] == '1' and old[1] then return 0 end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'v', ARGV[1], 'n', ARGV[2], 'size', ARGV[3], 'sha256', ARGV[4])
if tonumber(ARGV[5]) > 0 then redis.call('EXPIRE', KEYS[1], ARGV[5]) end
if KEYS[2] ~= '' then redis.call('SADD', KEYS[2], ARGV[7]) end
if old[1] and old[1] ~= ARGV[1] then
  for i = 0, tonumber(old[2]) - 1 do redis.call('DEL', KEYS[1] .. '@' .. old[1] .. '#' .. i) end
end
return 1
"""
# Delete a value and its chunks. KEYS: head, index ('' for none), refs ('' for none). ARGV: key,
# member. With refs: drop member from that set first, and delete only when no member is left.
_DELETE = """
if KEYS[3] ~= '' then
  redis.call('SREM', KEYS[3], ARGV[2])
  if redis.call('SCARD', KEYS[3]) > 0 then return 0 end
end
local old = redis.call('HMGET', KEYS[1], 'v', 'n')
if old[1] then
  for i = 0, tonumber(old[2]) - 1 do redis.call('DEL', KEYS[1] .. '@' .. old[1] .. '#' .. i) end
end
redis.call('DEL', KEYS[1])
if KEYS[2] ~= '' then redis.call('SREM', KEYS[2], ARGV[1]) end
return 1
"""


class RedisBlobs(Blobs):
    def __init__(self, r: redis.Redis, prefix: str = "ms:blob:", chunk_bytes: int = 8 << 20,
                 ttl_s: int | None = None, indexed: bool = True):
        """r must return bytes (decode_responses off). ttl_s: values expire (the weights cache)."""
        self.r, self.prefix, self.chunk, self.ttl = r, prefix, max(1, chunk_bytes), ttl_s or 0
        self.index = prefix + "index" if indexed else ""
        self.where = "the service's shared store"
        self._swap = r.register_script(_SWAP)
        self._delete = r.register_script(_DELETE)
        self._hold = r.register_script("redis.call('SADD', KEYS[2], ARGV[1]) return redis.call('EXISTS', KEYS[1])")

    @classmethod
    def from_url(cls, url: str, **kw) -> RedisBlobs:
        return cls(redis.Redis.from_url(url, health_check_interval=30), **kw)

    def _head(self, key: str) -> str:
        return self.prefix + check_key(key)

    def _write(self, key: str, data: bytes, only_if_absent: bool) -> bool:
        head, v = self._head(key), uuid.uuid4().hex[:12]
        n = -(-len(data) // self.chunk) if data else 0
        names = [f"{head}@{v}#{i}" for i in range(n)]
        for start in range(0, n, 8):  # a few chunks per round trip: bounded client buffers
            pipe = self.r.pipeline(transaction=False)
            for i in range(start, min(n, start + 8)):
                pipe.set(names[i], data[i * self.chunk: (i + 1) * self.chunk], ex=self.ttl or None)
            pipe.execute()
        done = int(self._swap(keys=[head, self.index], args=[v, n, len(data), hashlib.sha256(data).hexdigest(),
                                                              self.ttl, int(only_if_absent), key]))
        if not done and names:
            self.r.delete(*names)
        return bool(done)

    def put(self, key: str, data: bytes) -> None:
        self._write(key, data, False)

    def create(self, key: str, data: bytes) -> bool:
        return self._write(key, data, True)

    def get(self, key: str) -> bytes | None:
        head = self._head(key)
        for _ in range(2):  # a put may swap versions between reading the head and its chunks
            h = self.r.hgetall(head)
            if not h:
                return None
            v, n = h[b"v"].decode(), int(h[b"n"])
            parts: list[bytes | None] = []
            for start in range(0, n, 8):
                parts += self.r.mget([f"{head}@{v}#{i}" for i in range(start, min(n, start + 8))])
            if all(p is not None for p in parts):
                data = b"".join(parts)  # type: ignore[arg-type]
                if len(data) == int(h[b"size"]) and hashlib.sha256(data).hexdigest() == h[b"sha256"].decode():
                    return data
            if self.r.hget(head, "v") == h[b"v"]:
                return None  # the same version, incomplete: evicted in part
        return None

    def size(self, key: str) -> int | None:
        got = self.r.hget(self._head(key), "size")
        return None if got is None else int(got)

    def delete(self, key: str) -> None:
        self._delete(keys=[self._head(key), self.index, ""], args=[key, ""])

    # A value that several holders share (content-addressed): each holder is a member of a set of
    # references, added before the value is written and removed in the same script that deletes it,
    # so a value is never deleted while a holder is between taking its reference and using it.
    def hold(self, key: str, data: bytes, refs: str, member: str) -> None:
        """Add member to the references of key, and store data under key unless it is there."""
        if not int(self._hold(keys=[self._head(key), refs], args=[member])):
            self._write(key, data, True)

    def release(self, key: str, refs: str, member: str) -> bool:
        """Drop member's reference; delete the value when it was the last one (True then)."""
        return bool(self._delete(keys=[self._head(key), self.index, refs], args=[key, member]))

    def keys(self, prefix: str = "") -> list[str]:
        if not self.index:
            raise TypeError("this store keeps no index of its keys")
        return sorted(k for k in (m.decode() for m in self.r.sscan_iter(self.index, count=1000)) if k.startswith(prefix))


@lru_cache
def _open(url: str, chunk_bytes: int, ttl_s: int, indexed: bool) -> RedisBlobs:
    return RedisBlobs.from_url(url, chunk_bytes=chunk_bytes, ttl_s=ttl_s, indexed=indexed)


def shared(s: Settings) -> RedisBlobs:
    """The durable store beside the records (noeviction, AOF): checkpoints, the bank, imported adapters."""
    return _open(s.redis_url, s.blob_chunk_bytes, 0, True)


def weights_cache(s: Settings) -> RedisBlobs:
    """Adapted weights in the cache Redis (LRU, a TTL): what is evicted is adapted again."""
    return _open(s.cache_redis_url, s.blob_chunk_bytes, s.weights_ttl_s, False)


def store_of(s: Settings, key: str) -> RedisBlobs:
    """Where a task's weights key lives: imported adapters in the durable store, the rest in the cache."""
    return shared(s) if key.startswith("imported/") else weights_cache(s)
