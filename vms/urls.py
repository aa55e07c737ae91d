from django.urls import path

from vms import views

app_name = "dashboard"

urlpatterns = [
    path("", views.home, name="home"),
    path("vms/new/", views.vm_create, name="vm-create"),
    path("vms/<uuid:vm_id>/", views.vm_detail, name="vm-detail"),
    path("operations/", views.operation_list, name="operations"),
    path("audit/", views.audit_list, name="audit"),
    path("hosts/", views.host_list, name="hosts"),
    path("system/", views.system_status, name="system"),
]
