"""Django's Redis cache with one connection pool per process instead of one per thread.

Django keeps a cache object per thread (and per async context), and its Redis backend gives
every cache object pools of its own. Under ASGI every request runs in a new thread, so every
request that touched the cache — each API request does, for its rate limits — opened a new
TCP connection to Redis (a handshake and two ``CLIENT SETINFO`` round trips, and redis-py reads
its own version from the installed package's metadata for each one) and dropped it after.
Here the pools are shared by the process: redis-py's pools are thread-safe, and a pool used
after a fork (Celery's pool workers) discards the parent's connections itself.

The connections' connect and read timeouts are the cache's ``OPTIONS`` (settings.py).
"""

from __future__ import annotations

import threading

from django.core.cache.backends.redis import RedisCache, RedisCacheClient

_pools: dict[tuple, object] = {}
_pools_lock = threading.Lock()


_clients: dict[int, object] = {}


class SharedPoolRedisCacheClient(RedisCacheClient):
    def get_client(self, key=None, *, write=False):
        # One client object per shared pool (redis-py's clients are thread-safe over a pool):
        # Django builds a new one, with its response callbacks, for every cache call.
        pool = self._get_connection_pool(write)
        client = _clients.get(id(pool))
        if client is None:
            with _pools_lock:
                client = _clients.setdefault(id(pool), self._client(connection_pool=pool))
        return client

    def _get_connection_pool(self, write):
        index = self._get_connection_pool_index(write)
        key = (self._servers[index], tuple(sorted((k, repr(v)) for k, v in self._pool_options.items())))
        pool = _pools.get(key)
        if pool is None:
            with _pools_lock:
                pool = _pools.get(key)
                if pool is None:
                    pool = _pools[key] = self._pool_class.from_url(self._servers[index], **self._pool_options)
        return pool


class SharedPoolRedisCache(RedisCache):
    def __init__(self, server, params):
        super().__init__(server, params)
        self._class = SharedPoolRedisCacheClient
