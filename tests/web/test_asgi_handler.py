"""The web process's ASGI handler keeps request threads for later requests
(sandbox_site/asgi_handler.py), never handing a request a thread another one still uses."""

import asyncio
import threading

import pytest
from asgiref.testing import ApplicationCommunicator

from sandbox_site import asgi_handler
from sandbox_site.asgi_handler import PooledThreadASGIHandler

pytestmark = [pytest.mark.urls("tests.web.asgi_thread_urls"), pytest.mark.django_db(transaction=True)]


def _scope(path):
    headers = [(b"host", b"localhost")]
    return {
        "type": "http",
        "method": "GET",
        "path": path,
        "query_string": b"",
        "headers": headers,
        "client": ("127.0.0.1", 1),
    }


async def _get(handler, path):
    comm = ApplicationCommunicator(handler, _scope(path))
    await comm.send_input({"type": "http.request", "body": b""})
    start = await comm.receive_output(10)
    body = await comm.receive_output(10)
    await comm.wait(10)
    return start["status"], body["body"]


async def test_requests_one_after_the_other_run_on_one_kept_thread():
    handler = PooledThreadASGIHandler()
    asgi_handler._idle.clear()
    status, first = await _get(handler, "/thread/")
    assert status == 200
    for _ in range(1000):  # given back once its thread ran the request's last step
        if asgi_handler._idle:
            break
        await asyncio.sleep(0.01)
    _, second = await _get(handler, "/thread/")
    # Names are unique per thread made (thread idents are reused once a thread ended).
    assert first == second and first.startswith(b"request-")  # no new thread for the second request


def test_a_thread_still_running_a_requests_work_is_not_handed_out_until_it_is_done():
    # Whatever a request leaves on its thread (a view its client no longer waits for) runs to
    # its end before the thread is idle for another request.
    asgi_handler._idle.clear()
    executor = asgi_handler._take()
    release = threading.Event()
    executor.submit(release.wait, 30)
    asgi_handler._give_back(executor)
    assert not release.wait(0.3) and list(asgi_handler._idle) == []  # still busy: not idle
    assert asgi_handler._take() is not executor  # the next request gets another thread
    release.set()
    for _ in range(1000):
        if list(asgi_handler._idle) == [executor]:
            break
        threading.Event().wait(0.01)
    assert list(asgi_handler._idle) == [executor]


def test_idle_threads_beyond_the_limit_end(monkeypatch):
    monkeypatch.setattr(asgi_handler, "MAX_IDLE", 1)
    asgi_handler._idle.clear()
    kept, extra = asgi_handler._take(), asgi_handler._take()
    for executor in (kept, extra):
        asgi_handler._give_back(executor)
    for _ in range(1000):
        if extra._shutdown:
            break
        threading.Event().wait(0.01)
    assert list(asgi_handler._idle) == [kept] and extra._shutdown


async def test_a_request_runs_its_middleware_and_view_in_its_thread_without_bouncing(monkeypatch):
    # Django's asynchronous middleware chain ran the synchronous middleware in the request's
    # thread, went back to the event loop for the rest (async_to_sync) and into the thread
    # again for the view: the handler runs the synchronous chain whole in the thread.
    from asgiref import sync

    hops = []
    real = sync.AsyncToSync.__call__

    def counted(self, *args, **kwargs):
        hops.append(getattr(self, "awaitable", None))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(sync.AsyncToSync, "__call__", counted)
    handler = PooledThreadASGIHandler()
    status, name = await _get(handler, "/thread/")
    assert status == 200 and name.startswith(b"request-")
    assert hops == []
