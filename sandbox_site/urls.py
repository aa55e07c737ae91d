from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView
from rest_framework.routers import DefaultRouter

from accounts.api import AuditEventViewSet, ProjectViewSet, TokenViewSet, UserViewSet
from networking.api import NetworkViewSet, VmNetworkViewSet, VmPortForwardViewSet
from sandbox_site import health, metrics, views
from snapshots.api import MySnapshotRetentionView, SnapshotViewSet, VmSnapshotViewSet
from vms.api import OperationViewSet, TemplateViewSet, VmViewSet
from vms.exec_api import exec_urlpatterns
from vms.hosts_api import HostViewSet
from vms.images_api import ImageViewSet

router = DefaultRouter()
router.register("tokens", TokenViewSet, basename="token")
router.register("users", UserViewSet, basename="user")
router.register("projects", ProjectViewSet, basename="project")
router.register("audit-events", AuditEventViewSet, basename="auditevent")
router.register("vms", VmViewSet, basename="vm")
router.register("operations", OperationViewSet, basename="operation")
router.register("templates", TemplateViewSet, basename="template")
router.register("images", ImageViewSet, basename="image")
router.register("networks", NetworkViewSet, basename="network")
router.register("snapshots", SnapshotViewSet, basename="snapshot")
router.register("hosts", HostViewSet, basename="host")

urlpatterns = [
    path("healthz", health.healthz, name="healthz"),
    path("readyz", health.readyz, name="readyz"),
    path("metrics", metrics.metrics_view, name="metrics"),
    path("favicon.ico", views.favicon, name="favicon"),
    path(
        "api/v1/vms/<str:vm_id>/port-forwards/",
        VmPortForwardViewSet.as_view({"get": "list", "post": "create"}),
        name="vm-port-forwards",
    ),
    path(
        "api/v1/vms/<str:vm_id>/port-forwards/<str:pk>/",
        VmPortForwardViewSet.as_view({"delete": "destroy"}),
        name="vm-port-forward-detail",
    ),
    path("api/v1/vms/<str:vm_id>/nics/", VmNetworkViewSet.as_view({"get": "nics", "post": "nic_add"}), name="vm-nics"),
    path(
        "api/v1/vms/<str:vm_id>/nics/<str:nic_id>/",
        VmNetworkViewSet.as_view({"delete": "nic_remove"}),
        name="vm-nic-detail",
    ),
    path("api/v1/vms/<str:vm_id>/egress/", VmNetworkViewSet.as_view({"put": "egress"}), name="vm-egress"),
    path(
        "api/v1/vms/<str:vm_id>/snapshots/",
        VmSnapshotViewSet.as_view({"get": "list", "post": "create"}),
        name="vm-snapshots",
    ),
    path(
        "api/v1/vms/<str:vm_id>/snapshot-retention/",
        VmSnapshotViewSet.as_view({"get": "retention", "put": "retention_set"}),
        name="vm-snapshot-retention",
    ),
    path("api/v1/snapshot-retention/", MySnapshotRetentionView.as_view(), name="snapshot-retention"),
    *exec_urlpatterns(),
    path("api/v1/", include(router.urls)),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="api-docs"),
    path("admin/", admin.site.urls),
    path("", include("accounts.urls")),
    path("", include("vms.urls")),
]

handler400 = "sandbox_site.views.bad_request"
handler404 = "sandbox_site.views.not_found"
handler403 = "sandbox_site.views.permission_denied"
handler500 = "sandbox_site.views.server_error"
