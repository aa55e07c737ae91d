"""Django's ASGI handler with its request threads kept for later requests.

Django runs each request's synchronous part (middleware, views) in a thread-sensitive context
of its own: asgiref starts a thread for it and, once the request is done, another thread to
join the first — two thread starts per request. Here a request takes an idle single-thread
executor of the process (or makes one) and gives it back once its thread is idle again: after
anything the request still runs there (a view whose client went away is not interrupted) has
finished, so a request never waits behind another's work. At most ``MAX_IDLE`` idle threads
are kept; the rest end. Thread-local state is what a threaded WSGI server leaves between the
requests of one thread: Django closes (or returns to the pool) the request's database
connections when it finishes (``request_finished``).
"""

from __future__ import annotations

import collections
import itertools
from concurrent.futures import ThreadPoolExecutor

from asgiref.sync import ThreadSensitiveContext, sync_to_async
from django.core.handlers.asgi import ASGIHandler

MAX_IDLE = 32
_idle: collections.deque[ThreadPoolExecutor] = collections.deque()
_numbers = itertools.count(1)  # each thread's name tells which request thread it is


def _noop() -> None:
    return None


def _take() -> ThreadPoolExecutor:
    try:
        return _idle.pop()
    except IndexError:
        return ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"request-{next(_numbers)}")


def _give_back(executor: ThreadPoolExecutor) -> None:
    def idle(_future) -> None:  # runs after whatever the request left on the thread
        if len(_idle) < MAX_IDLE:
            _idle.append(executor)
        else:
            executor.shutdown(wait=False)

    try:
        executor.submit(_noop).add_done_callback(idle)
    except RuntimeError:  # shut down (the interpreter is exiting)
        pass


class PooledThreadASGIHandler(ASGIHandler):
    def __init__(self) -> None:
        # The middleware chain in its synchronous form, run whole in the request's thread (as a
        # WSGI server runs it). Django's asynchronous form bounced between that thread and the
        # event loop three more times per request: its synchronous middleware ran in the thread,
        # the asynchronous-capable rest on the loop, and the (synchronous) view in the thread
        # again.
        super(ASGIHandler, self).__init__()
        self.load_middleware(is_async=False)

    async def get_response_async(self, request):
        return await sync_to_async(self.get_response, thread_sensitive=True)(request)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            raise ValueError(f"Django can only handle ASGI/HTTP connections, not {scope['type']}.")
        executor = _take()
        try:
            async with ThreadSensitiveContext(executor=executor):
                await self.handle(scope, receive, send)
        finally:
            _give_back(executor)
