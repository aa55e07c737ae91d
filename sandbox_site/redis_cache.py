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
from typing import Any

from django.core.cache.backends.redis import RedisCache, RedisCacheClient

_clients: dict[tuple, Any] = {}  # (server, pool options) -> a client over the process's pool
_lock = threading.Lock()


class SharedPoolRedisCacheClient(RedisCacheClient):
    def get_client(self, key=None, *, write=False):
        # One client per server and process (redis-py's clients are thread-safe over their
        # pool); Django builds a new one, with its response callbacks, for every cache call.
        index = self._get_connection_pool_index(write)
        server = self._servers[index]
        options = tuple(sorted((k, repr(v)) for k, v in self._pool_options.items()))
        client = _clients.get((server, options))
        if client is None:
            with _lock:
                client = _clients.get((server, options))
                if client is None:
                    pool = self._pool_class.from_url(server, **self._pool_options)
                    client = _clients[(server, options)] = self._client(connection_pool=pool)
        return client

    def _get_connection_pool(self, write):
        return self.get_client(write=write).connection_pool


class SharedPoolRedisCache(RedisCache):
    def __init__(self, server, params):
        super().__init__(server, params)
        self._class = SharedPoolRedisCacheClient
