from django.urls import path

from vms import views

app_name = "dashboard"

urlpatterns = [
    path("", views.home, name="home"),
]
