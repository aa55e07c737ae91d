from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import mixins, status, viewsets
from rest_framework.decorators import action
from rest_framework.response import Response

from accounts import selectors, services
from accounts.models import ApiToken
from accounts.roles import user_is_operator
from accounts.serializers import (
    AUDIT_EVENT_ROWS,
    AuditEventSerializer,
    TokenCreateSerializer,
    TokenSerializer,
    UserCreateSerializer,
    UserSerializer,
)
from sandbox_site.errors import NotPermitted


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
        token, secret = services.token_create(user=request.user, actor=request.user, **data.validated_data)
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
