import pytest
from rest_framework.test import APIClient

from accounts.models import Role
from tests.factories import PASSWORD, UserFactory, VmFactory


@pytest.fixture(autouse=True)
def _never_the_host_network_namespace(settings):
    # VM code paths plumb bridges and TAPs: a namespace that does not exist makes any stray
    # plumbing fail instead of touching the host. Tests that plumb create their own.
    settings.SANDBOX_NETNS = "msbtest-absent"


@pytest.fixture(autouse=True)
def _fast_password_hashing(settings):
    # PBKDF2 at production strength costs ~0.3 s per login; the tests log in a lot.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture(autouse=True)
def _no_rate_limits(settings):
    # The suite sends far more requests per user and from 127.0.0.1 than any budget allows;
    # tests/security/test_rate_limits.py sets its own.
    settings.SANDBOX_RATE_LIMITS = {}


@pytest.fixture(autouse=True)
def _seal_after_each_response(settings):
    # In-process requests seal their audit rows when their response is closed, in the test's
    # thread and transaction; the web process's sealer thread (the default) is tested in
    # tests/accounts/test_audit_sealing.py and runs in every daphne the system tests start.
    settings.SANDBOX_AUDIT_SEAL_DELAY_SECONDS = 0


@pytest.fixture
def api():
    """An API client; ``api.as_user(user)`` logs in with a session."""
    client = APIClient()

    def as_user(user):
        client.force_authenticate(user=None)
        client.login(username=user.username, password=PASSWORD)
        return client

    client.as_user = as_user
    return client


@pytest.fixture
def owner(db):
    return UserFactory(username="owner", role=Role.USER)


@pytest.fixture
def grantee(db):
    return UserFactory(username="grantee", role=Role.USER)


@pytest.fixture
def stranger(db):
    return UserFactory(username="stranger", role=Role.USER)


@pytest.fixture
def viewer(db):
    return UserFactory(username="viewer", role=Role.VIEWER)


@pytest.fixture
def operator(db):
    return UserFactory(username="operator", role=Role.OPERATOR)


@pytest.fixture
def admin_user(db):
    return UserFactory(username="root", role=Role.ADMIN)


@pytest.fixture
def vm(owner):
    return VmFactory(owner=owner, name="owned-vm")
