from tests.vms.conftest import fake, run_ops  # noqa: F401 - the fake-driver fixtures
