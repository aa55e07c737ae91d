from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import mixins, status, viewsets
from rest_framework.decorators import action
from rest_framework.response import Response

from accounts import selectors, services
from accounts.models import ApiToken, Project
from accounts.permissions import project_or_404
from accounts.roles import user_is_operator
from accounts.serializers import (
    AUDIT_EVENT_ROWS,
    AuditEventSerializer,
    ProjectCreateSerializer,
    ProjectMemberSetSerializer,
    ProjectSerializer,
    ProjectUsageSerializer,
    QuotaSerializer,
    TokenCreateSerializer,
    TokenSerializer,
    UserCreateSerializer,
    UserSerializer,
)
from sandbox_site.errors import ApplicationError, NotPermitted


class TokenViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, mixins.DestroyModelMixin, viewsets.GenericViewSet):
    """Your API tokens. Creating one needs a password or session login (not another token),
    so a leaked token cannot mint more. The secret is in the create response only."""

    queryset = ApiToken.objects.all()
    serializer_class = TokenSerializer
    lookup_field = "id"
    lookup_value_converter = "uuid"

    def get_queryset(self):
        return selectors.token_list_for(self.request.user)

    @extend_schema(request=TokenCreateSerializer, responses={201: TokenSerializer})
    def create(self, request):
        if isinstance(request.auth, ApiToken):
            raise NotPermitted("Tokens are created with a password or a dashboard session, not with a token.")
        data = TokenCreateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        values = dict(data.validated_data)
        if "project" in values:
            values["project"] = project_or_404(request.user, values["project"])
        token, secret = services.token_create(user=request.user, actor=request.user, **values)
        body = TokenSerializer(token).data
        body["token"] = secret
        return Response(body, status=status.HTTP_201_CREATED)

    def perform_destroy(self, instance):
        services.token_revoke(token=instance, actor=self.request.user)


class UserViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    """Admins create users; operators and admins list them; everyone sees ``me``."""

    serializer_class = UserSerializer
    lookup_field = "id"

    def get_queryset(self):
        from django.contrib.auth import get_user_model

        qs = get_user_model().objects.order_by("username").prefetch_related("groups")
        return qs if user_is_operator(self.request.user) else qs.filter(pk=self.request.user.pk)

    @extend_schema(request=UserCreateSerializer, responses={201: UserSerializer})
    def create(self, request):
        data = UserCreateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        user = services.user_create(actor=request.user, **data.validated_data)
        return Response(UserSerializer(user).data, status=status.HTTP_201_CREATED)

    @extend_schema(request=None, responses={200: UserSerializer})
    @action(detail=True, methods=["post"])
    def unlock(self, request, id=None):
        """Clear the user's login locks and back-off (operators and admins; audited)."""
        user = self.get_object()  # others see only themselves: 404 for a stranger
        services.user_unlock(username=user.username, actor=request.user)
        return Response(UserSerializer(user).data)

    @action(detail=False, methods=["get"])
    def me(self, request):
        return Response(UserSerializer(request.user).data)

    @extend_schema(methods=["GET"], responses={200: QuotaSerializer})
    @extend_schema(methods=["PATCH"], request=QuotaSerializer, responses={200: QuotaSerializer})
    @action(detail=True, methods=["get", "patch"])
    def quota(self, request, id=None):
        """The user's own limits (over every VM they create, in any project): ``GET`` for the
        user and operators, ``PATCH`` some of the fields for operators (audited)."""
        user = self.get_object()
        if request.method == "GET":
            return Response(selectors.quota_of_user(user))
        data = QuotaSerializer(data=request.data, partial=True)
        data.is_valid(raise_exception=True)
        return Response(services.quota_user_set(user=user, values=dict(data.validated_data), actor=request.user))


class ProjectViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    """Projects: yours (operators see all). ``POST`` creates a team project you own; project
    owners add members or change their role (``POST members/``) and remove them (``DELETE
    members/{username}/``); members read the shared quota and what the project uses
    (``GET usage/``); operators set the quota (``PATCH quota/``). Every change is audited."""

    serializer_class = ProjectSerializer
    queryset = Project.objects.none()  # for the schema's path parameter; rows come from get_queryset
    lookup_field = "id"
    lookup_value_converter = "uuid"

    def get_queryset(self):
        return selectors.project_list_for(self.request.user).prefetch_related("memberships__user", "templates")

    @extend_schema(request=ProjectCreateSerializer, responses={201: ProjectSerializer})
    def create(self, request):
        data = ProjectCreateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        project = services.project_create(actor=request.user, **data.validated_data)
        return Response(ProjectSerializer(project).data, status=status.HTTP_201_CREATED)

    @extend_schema(request=ProjectMemberSetSerializer, responses={200: ProjectSerializer})
    @action(detail=True, methods=["post"])
    def members(self, request, id=None):
        """Add a member or change their role (project owners)."""
        project = self.get_object()
        data = ProjectMemberSetSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        user = _active_user(data.validated_data["username"])
        services.project_member_set(project=project, user=user, role=data.validated_data["role"], actor=request.user)
        return Response(ProjectSerializer(self.get_queryset().get(pk=project.pk)).data)

    @extend_schema(request=None, responses={204: None})
    @action(detail=True, methods=["delete"], url_path=r"members/(?P<username>[^/]{1,150})")
    def member_remove(self, request, id=None, username=None):
        """Remove a member (project owners; any member may leave)."""
        project = self.get_object()
        services.project_member_remove(project=project, user=_active_user(username), actor=request.user)
        return Response(status=status.HTTP_204_NO_CONTENT)

    @extend_schema(responses={200: ProjectUsageSerializer})
    @action(detail=True, methods=["get"])
    def usage(self, request, id=None):
        """The project's shared quota and what its VMs and snapshots use now (members)."""
        from vms.selectors import usage_of_project

        project = self.get_object()
        return Response({"quota": selectors.quota_of_project(project), "usage": usage_of_project(project)})

    @extend_schema(methods=["GET"], responses={200: QuotaSerializer})
    @extend_schema(methods=["PATCH"], request=QuotaSerializer, responses={200: QuotaSerializer})
    @action(detail=True, methods=["get", "patch"])
    def quota(self, request, id=None):
        """The project's shared limits: ``GET`` for members, ``PATCH`` some fields for operators (audited)."""
        project = self.get_object()
        if request.method == "GET":
            return Response(selectors.quota_of_project(project))
        data = QuotaSerializer(data=request.data, partial=True)
        data.is_valid(raise_exception=True)
        values = dict(data.validated_data)
        return Response(services.quota_project_set(project=project, values=values, actor=request.user))


def _active_user(username: str):
    from django.contrib.auth import get_user_model

    user = get_user_model().objects.filter(username=username, is_active=True).first()
    if user is None:
        raise ApplicationError("No such user.", code="not_found", status_code=404, details={"username": "unknown"})
    return user


@extend_schema(
    parameters=[
        OpenApiParameter(name, str, required=False)
        for name in ("actor", "action", "object_type", "object_id", "result", "request_id", "since", "until")
    ]
)
class AuditEventViewSet(viewsets.ReadOnlyModelViewSet):
    serializer_class = AuditEventSerializer

    def get_queryset(self):
        qs = selectors.audit_events_visible(self.request.user)
        return selectors.audit_events_filter(qs, self.request.query_params)

    def list(self, request, *args, **kwargs):
        # values() rows rendered with AuditEventSerializer's fields (sandbox_site/api_rows.py).
        rows = self.filter_queryset(self.get_queryset()).values(*AUDIT_EVENT_ROWS.values)
        return self.get_paginated_response(AUDIT_EVENT_ROWS.render_many(self.paginate_queryset(rows)))
