"""URLs for tests/web/test_asgi_handler.py: views that tell which thread ran them."""

import threading

from django.http import HttpResponse
from django.urls import path


def which_thread(request):
    return HttpResponse(threading.current_thread().name)  # unique per request thread made


urlpatterns = [path("thread/", which_thread)]
