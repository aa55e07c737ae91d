"""URLs for tests/web/test_asgi_handler.py: views that tell which thread ran them."""

import threading

from django.http import HttpResponse
from django.urls import path


def which_thread(request):
    return HttpResponse(str(threading.get_ident()))


urlpatterns = [path("thread/", which_thread)]
