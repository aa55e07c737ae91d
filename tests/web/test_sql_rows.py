"""The plain-SQL reads of the hottest rows (sandbox_site.sql_rows) give what the ORM gives."""

from datetime import timedelta

import pytest
from django.utils import timezone
from rest_framework.exceptions import NotFound

from accounts.models import ApiToken
from accounts.permissions import vm_for
from accounts.services import token_authenticate, token_create
from vms.models import VM


def _fields(obj):
    return {field.attname: getattr(obj, field.attname) for field in type(obj)._meta.concrete_fields}


@pytest.mark.django_db
def test_a_vm_read_in_plain_sql_equals_the_orms_with_every_kind_of_value(owner, vm):
    VM.objects.filter(pk=vm.pk).update(
        metadata={"nested": {"list": [1, "two", None]}, "unicode": "ä\u2603"},
        vmm_pid=4242,
        started_at=timezone.now() - timedelta(minutes=3),
        last_error="boom",
    )
    orm = VM.objects.get(pk=vm.pk)
    plain = vm_for(owner, str(vm.pk), action="vm.exec", related=())
    assert _fields(plain) == _fields(orm)
    assert plain.metadata == {"nested": {"list": [1, "two", None]}, "unicode": "ä\u2603"}
    assert plain._state.adding is False and plain._state.db == "default"
    plain.save(update_fields=["last_error"])  # an instance like any other: it saves
    assert plain.owner == owner  # relations load on access as usual


@pytest.mark.django_db
@pytest.mark.parametrize("vm_id", ["not-a-uuid", "00000000-0000-0000-0000-000000000000", "", "1' OR '1'='1"])
def test_a_malformed_or_missing_vm_id_is_the_same_404(owner, vm_id):
    with pytest.raises(NotFound):
        vm_for(owner, vm_id, action="vm.exec", related=())


@pytest.mark.django_db
def test_a_token_read_in_plain_sql_equals_the_orms_with_its_user(owner):
    token, secret = token_create(user=owner, name="t", actor=owner)
    found = token_authenticate(secret)
    orm = ApiToken.objects.select_related("user").get(pk=token.pk)
    assert _fields(found) == _fields(orm)
    assert ApiToken.user.field.is_cached(found) and _fields(found.user) == _fields(orm.user)
    ApiToken.objects.filter(pk=token.pk).update(revoked_at=timezone.now())
    assert token_authenticate(secret) is None
    assert token_authenticate(secret[:-1] + ("a" if secret[-1] != "a" else "b")) is None
