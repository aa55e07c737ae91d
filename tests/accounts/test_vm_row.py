"""``vm_for`` reads the VM in a URL with its related rows in plain SQL
(``vms.selectors.vm_row``): the same instances, with the same related rows cached, as
``VM.objects.select_related(...)``, and the same 404 for a missing or malformed id."""

from __future__ import annotations

import uuid

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from rest_framework.exceptions import NotFound

from accounts.permissions import vm_for
from tests.factories import HostFactory, ImageFactory, TemplateFactory, VmFactory
from vms.models import VM, VM_ROW_RELATED
from vms.selectors import vm_row

pytestmark = pytest.mark.django_db


def _fields(obj) -> dict:
    return {field.attname: getattr(obj, field.attname) for field in obj._meta.concrete_fields}


def test_it_reads_the_vm_and_its_related_rows_as_select_related(owner):
    template = TemplateFactory(name="row-template", image=ImageFactory(name="row-template-image"))
    vms = [
        VmFactory(owner=owner, template=template, host=HostFactory(name="row-host"), image=ImageFactory(name="own")),
        VmFactory(owner=owner, template=template, host=None, image=None, metadata={"k": [1, "v"]}),
    ]
    for vm in vms:
        for related in (VM_ROW_RELATED, ("template",), ("image", "template__image"), ()):
            expected = VM.objects.select_related(*related).get(pk=vm.pk)
            got = vm_row(str(vm.pk), related)
            assert _fields(got) == _fields(expected)
            with CaptureQueriesContext(connection) as queries:
                for path in related:
                    mine, theirs = got, expected
                    for name in path.split("__"):
                        mine, theirs = getattr(mine, name), getattr(theirs, name)
                        assert (mine is None) == (theirs is None)
                        if mine is None:
                            break
                        assert type(mine) is type(theirs) and _fields(mine) == _fields(theirs)
            assert len(queries) == 0, [q["sql"] for q in queries.captured_queries]  # cached, as select_related


def test_it_answers_404_for_a_missing_or_malformed_id(owner):
    for vm_id in (uuid.uuid4(), "not-a-uuid", "", None):
        with pytest.raises(NotFound):
            vm_for(owner, vm_id, action="vm.retrieve")
