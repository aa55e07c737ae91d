"""Fixtures for the Django-free VMM driver tests (run with ``-p no:django``).

VM tests boot real guests under QEMU (TCG here) from an image built once per session
in ``$SANDBOX_IMAGE_DIR`` (default /work/main/var/images); the build is cached by input
digest, so only the first run pays for debootstrap.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from vms.vmm.base import VmmError, VmSpec
from vms.vmm.confinement import VmmConfinement
from vms.vmm.image import ImageArtifacts, build_image
from vms.vmm.qemu import QemuDriver

IMAGE_DIR = Path(os.environ.get("SANDBOX_IMAGE_DIR", "/work/main/var/images"))
# Real VMs run confined as in production: the VMM user (created by
# scripts/install-system-packages.sh, which `make test` runs) and a cgroup per VMM.
VMM_USER = os.environ.get("SANDBOX_VMM_USER", "msbx-vmm")
TEST_CGROUP_PARENT = "msbx-test"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "vm: boots real microVMs under QEMU (slow, needs root and qemu)")


@pytest.fixture(scope="session")
def image() -> ImageArtifacts:
    if os.geteuid() != 0 or shutil.which("qemu-system-x86_64") is None:
        pytest.skip("VM tests need root and qemu-system-x86_64")
    return build_image(IMAGE_DIR, progress=lambda msg: print(f"[image] {msg}"))


@pytest.fixture(scope="session")
def confinement() -> VmmConfinement:
    conf = VmmConfinement(user=VMM_USER, cgroup_parent=TEST_CGROUP_PARENT)
    try:
        conf.vmm_user()
    except VmmError as exc:
        pytest.fail(exc.message)
    return conf


@pytest.fixture(scope="session")
def driver(confinement: VmmConfinement) -> QemuDriver:
    return QemuDriver(confinement=confinement)


def _short_runtime_root() -> Path:
    # Unix socket paths are limited to 107 bytes: keep runtime dirs short (not tmp_path).
    # Traversable (not listable) for the VMM user, which must reach its runtime directory.
    root = Path(tempfile.mkdtemp(prefix="vmt-", dir="/tmp"))
    root.chmod(0o711)
    return root


@pytest.fixture(scope="session")
def make_spec(image: ImageArtifacts, driver: QemuDriver) -> Iterator[Callable[..., VmSpec]]:
    """Factory of VmSpecs with unique runtime dirs; every VM is cleaned up at session end."""
    root = _short_runtime_root()
    made: list[VmSpec] = []

    def factory(name: str, **kwargs: object) -> VmSpec:
        spec = VmSpec(
            vm_id=name,
            runtime_dir=root / f"{name}-{len(made)}",
            kernel=image.kernel,
            initramfs=image.initramfs,
            base_image=image.rootfs,
            disk_gib=2,
            **kwargs,  # type: ignore[arg-type]
        )
        made.append(spec)
        return spec

    yield factory
    for spec in made:
        driver.cleanup(spec)
    shutil.rmtree(root, ignore_errors=True)
