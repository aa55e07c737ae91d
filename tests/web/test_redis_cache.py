"""The cache (and with it the API's rate limits) keeps its Redis connections across requests."""

import threading

from django.core.cache import cache, caches


def _connections_opened(client) -> int:
    return int(client.info("stats")["total_connections_received"])


def test_requests_in_new_threads_reuse_the_processs_redis_connections():
    # Under ASGI each request runs in a new thread with a cache object of its own; each used to
    # open (and drop) a TCP connection of its own: a handshake and two round trips per request.
    probe = cache._cache.get_client(write=True)
    cache.set("pool-probe", 1)
    before = _connections_opened(probe)

    def one_request():
        local = caches["default"]
        local.get("pool-probe")
        local.set("pool-probe", 2, 30)

    for _ in range(20):
        thread = threading.Thread(target=one_request)
        thread.start()
        thread.join(10)
    assert _connections_opened(probe) - before <= 2  # at most a spare, not one per thread
    assert cache.get("pool-probe") == 2


def test_cache_connections_have_timeouts():
    kwargs = cache._cache._get_connection_pool(True).connection_kwargs
    assert kwargs["socket_timeout"] and kwargs["socket_connect_timeout"]


def test_cache_calls_share_one_client_object_per_pool():
    first = caches["default"]._cache.get_client(write=True)
    seen = []
    thread = threading.Thread(target=lambda: seen.append(caches["default"]._cache.get_client(write=True)))
    thread.start()
    thread.join(10)
    assert seen == [first] and first.connection_pool is cache._cache._get_connection_pool(True)
