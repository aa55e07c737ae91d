"""Build the default Linux guest image from Debian packages (no Django).

Artifacts, cached under ``out_dir/<sha256 of inputs>/``:

- ``vmlinuz``         the host's installed Debian cloud kernel (``linux-image-cloud-amd64``)
- ``initramfs.cpio.gz`` busybox-static + the virtio/vsock modules of that kernel; it loads
  them with ``insmod`` in dependency order, mounts ``/dev/vda`` (ext4) and switch_roots
- ``rootfs.ext4``     sparse ext4 image (``mkfs.ext4 -d``, no loop mounts) holding a
  ``debootstrap --variant=minbase`` bookworm with python3, the guest agent, and busybox
  init (mounts, hostname, agent and power-button watcher respawned, root shell on ttyS0)
- ``manifest.json``   digest, inputs and sizes

The digest covers every input (kernel file, package list, agent source, init files,
busybox, builder version), so a changed input gives a new directory and an unchanged one
is never rebuilt. Builds run in a temporary directory next to the cache and are renamed
into place (atomic); a lock file serialises concurrent builders.

CLI: ``python -m vms.vmm.image OUT_DIR``.
"""

from __future__ import annotations

import argparse
import fcntl
import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from .base import VmmError
from .snapshot import sha256_file

BUILDER_VERSION = "2"
SUITE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
PACKAGES: tuple[str, ...] = ("python3", "procps", "iproute2")
ROOTFS_SIZE_MIB = 1024
BUSYBOX = Path("/bin/busybox")
AGENT_IN_IMAGE = "usr/local/lib/sandbox/sandbox_agent.py"
AGENT_SOURCE = Path(__file__).resolve().parents[2] / "guest_agents" / "linux" / "sandbox_agent.py"
# Modules the guest needs early; their dependencies are added from modules.dep.
INITRAMFS_MODULES: tuple[str, ...] = (
    "virtio_mmio",
    "virtio_pci",
    "virtio_blk",
    "virtio_console",
    "virtio_net",
    "virtio-rng",
    "vmw_vsock_virtio_transport",
    "button",
    "evdev",
)
DEBOOTSTRAP_TIMEOUT = 1800
STEP_TIMEOUT = 600

INITRAMFS_INIT = r"""#!/bin/busybox sh
# microvm-sandbox initramfs: load virtio modules, mount the root disk, switch_root.
/bin/busybox mkdir -p /proc /sys /dev /newroot /usr/bin /usr/sbin /sbin
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

root=/dev/vda
mmio_args=""
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        root=*) root="${arg#root=}" ;;
        virtio_mmio.device=*) mmio_args="$mmio_args device=${arg#virtio_mmio.device=}" ;;
        sandbox.debug=1) set -x ;;
    esac
done

while read -r mod; do
    [ -n "$mod" ] || continue
    case "$mod" in
        virtio_mmio.ko) insmod "/lib/modules/$mod" $mmio_args 2>/dev/null ;;
        *) insmod "/lib/modules/$mod" 2>/dev/null ;;
    esac
done < /lib/modules/load.order

i=0
while [ ! -b "$root" ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
if mount -t ext4 -o rw "$root" /newroot && { [ -L /newroot/sbin/init ] || [ -x /newroot/sbin/init ]; }; then
    mount --move /dev /newroot/dev
    umount /proc /sys
    exec switch_root /newroot /sbin/init
fi
echo "sandbox initramfs: cannot mount root $root; rescue shell (exit powers off)" >&2
setsid -c sh
poweroff -f
"""

INITTAB = """\
# microvm-sandbox guest: busybox init (no systemd).
::sysinit:/usr/local/lib/sandbox/rc.sysinit
::respawn:/usr/local/lib/sandbox/run-agent
::respawn:/usr/local/lib/sandbox/run-powerbtn
ttyS0::respawn:/usr/local/lib/sandbox/run-console
::ctrlaltdel:/usr/local/bin/busybox reboot
::shutdown:/usr/local/lib/sandbox/rc.shutdown
"""

# Hostname and network from the sandbox.* words (kernel command line here; the UEFI image
# also reads SMBIOS OEM strings, see image_uefi): ``sandbox_args`` prints them. Shared by both
# images' init scripts; ``$bb`` is the static busybox where there is one (else empty: the
# commands of the image's own PATH).
GUEST_SETUP = r"""name=""
for arg in $(sandbox_args); do
    case "$arg" in sandbox.hostname=*) name="${arg#sandbox.hostname=}" ;; esac
done
[ -n "$name" ] || name=$($bb cat /etc/hostname 2>/dev/null)
$bb hostname "${name:-sandbox}"
$bb ip link set lo up
# Network from the kernel command line (the cloud kernel has no CONFIG_IP_PNP, so no ip=):
# sandbox.ip=<ip>/<prefix> sandbox.gw=<gateway>, set by the host from its address database.
addr=""
gw=""
for arg in $(sandbox_args); do
    case "$arg" in
        sandbox.ip=*) addr="${arg#sandbox.ip=}" ;;
        sandbox.gw=*) gw="${arg#sandbox.gw=}" ;;
    esac
done
if [ -n "$addr" ]; then
    i=0
    while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 50 ]; do $bb sleep 0.1; i=$((i + 1)); done
    $bb ip link set eth0 up && $bb ip addr add "$addr" dev eth0 && echo "sandbox: eth0 $addr"
    [ -n "$gw" ] && $bb ip route add default via "$gw" dev eth0
fi
"""

RC_SYSINIT = (
    r"""#!/bin/sh
# Runs before the agent (busybox init waits for sysinit), so it uses shell built-ins and the
# static busybox's applets (this busybox has no mountpoint or nice): under TCG every start of a
# dynamically linked program costs a good part of a second.
bb=/usr/local/bin/busybox
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
sandbox_args() { $bb cat /proc/cmdline; }
[ -e /proc/mounts ] || $bb mount -t proc proc /proc
mounted() { while read -r _ dir _; do [ "$dir" = "$1" ] && return 0; done </proc/mounts; return 1; }
mounted /sys || $bb mount -t sysfs sysfs /sys
mounted /dev || $bb mount -t devtmpfs devtmpfs /dev
$bb mkdir -p /dev/pts /dev/shm
$bb mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /dev/pts
$bb mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /dev/shm
$bb mount -t tmpfs -o mode=755,nosuid,nodev tmpfs /run
$bb mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /tmp
$bb mount -o remount,rw /
$bb ln -sf /proc/self/fd /dev/fd 2>/dev/null
"""
    + GUEST_SETUP
    + r"""# Grow the filesystem to the (overlay) disk size; online, in the background, at the lowest
# priority so that it does not slow the agent's start.
(nice -n 19 resize2fs /dev/vda >/dev/null 2>&1 &)
echo "sandbox: init done"
"""
)

RUN_AGENT = r"""#!/bin/sh
# Respawned by init; the sleep throttles a crash loop. Log kept below 1 MiB.
# The agent is imported as a module, so Python uses the bytecode compiled when the image was
# built (__pycache__, checked against the source's mtime) instead of compiling 2,000 lines at
# every boot; -I -S: no site-packages scan, no environment (the agent needs the stdlib only).
bb=/usr/local/bin/busybox
log=/var/log/sandbox-agent.log
[ -f $log ] && [ "$($bb stat -c %s $log)" -gt 1048576 ] && $bb mv -f $log $log.1
/usr/bin/python3 -I -S -u -c 'import sys; sys.path.insert(0, "/usr/local/lib/sandbox")
import sandbox_agent; sys.exit(sandbox_agent.main())' >>$log 2>&1
$bb sleep 1
"""

RUN_CONSOLE = r"""#!/bin/sh
# Root shell on the serial console (no password: access is controlled on the host).
export HOME=/root TERM=vt100 PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
cd /root
exec /bin/bash -l
"""

RUN_POWERBTN = r"""#!/bin/sh
# Started with the agent; nice 19 leaves the boot's single vCPU to the agent first.
/usr/bin/nice -n 19 /usr/bin/python3 -I -S -u /usr/local/lib/sandbox/powerbtn.py \
    >>/var/log/sandbox-powerbtn.log 2>&1
/usr/local/bin/busybox sleep 1
"""

RC_SHUTDOWN = r"""#!/bin/sh
echo "sandbox: shutting down"
kill -TERM -1 2>/dev/null
sleep 0.3
sync
mount -o remount,ro / 2>/dev/null
sync
"""

POWEROFF = r"""#!/bin/sh
# busybox init performs the shutdown actions (rc.shutdown) and then powers off/reboots.
exec /usr/local/bin/busybox "$(basename "$0")" "$@"
"""

POWERBTN = r'''"""Power off cleanly when the (ACPI) power button is pressed (QEMU system_powerdown)."""
import glob
import os
import select
import struct
import time

KEY_POWER = 116
EV_KEY = 1
FMT = "llHHi"
SIZE = struct.calcsize(FMT)


def power_devices():
    fds = []
    for caps in glob.glob("/sys/class/input/event*/device/capabilities/key"):
        try:
            words = open(caps).read().split()
        except OSError:
            continue
        bits = 0
        for w in words:
            bits = (bits << 64) | int(w, 16)
        if bits >> KEY_POWER & 1:
            dev = "/dev/input/" + caps.split("/")[4]
            try:
                fds.append(os.open(dev, os.O_RDONLY | os.O_NONBLOCK))
            except OSError:
                pass
    return fds


fds = []
while not fds:
    fds = power_devices()
    if not fds:
        time.sleep(2)
poller = select.poll()
for fd in fds:
    poller.register(fd, select.POLLIN)
while True:
    for fd, _ in poller.poll():
        data = os.read(fd, SIZE * 64)
        for off in range(0, len(data) - SIZE + 1, SIZE):
            _, _, etype, code, value = struct.unpack_from(FMT, data, off)
            if etype == EV_KEY and code == KEY_POWER and value == 1:
                os.system("/usr/local/sbin/poweroff")
'''

FILES: dict[str, tuple[str, int]] = {
    "etc/inittab": (INITTAB, 0o644),
    "usr/local/lib/sandbox/rc.sysinit": (RC_SYSINIT, 0o755),
    "usr/local/lib/sandbox/rc.shutdown": (RC_SHUTDOWN, 0o755),
    "usr/local/lib/sandbox/run-agent": (RUN_AGENT, 0o755),
    "usr/local/lib/sandbox/run-console": (RUN_CONSOLE, 0o755),
    "usr/local/lib/sandbox/run-powerbtn": (RUN_POWERBTN, 0o755),
    "usr/local/lib/sandbox/powerbtn.py": (POWERBTN, 0o644),
    "usr/local/sbin/poweroff": (POWEROFF, 0o755),
    "usr/local/sbin/reboot": (POWEROFF, 0o755),
    "usr/local/sbin/halt": (POWEROFF, 0o755),
    "etc/hostname": ("sandbox\n", 0o644),
    "etc/hosts": ("127.0.0.1\tlocalhost\n127.0.1.1\tsandbox\n::1\tlocalhost ip6-localhost\n", 0o644),
    "etc/fstab": ("/dev/vda / ext4 rw,relatime 0 1\n", 0o644),
}


@dataclass(frozen=True)
class ImageArtifacts:
    """Paths of a built guest image. ``digest`` names the cache directory."""

    kernel: Path
    initramfs: Path
    rootfs: Path
    digest: str

    @property
    def directory(self) -> Path:
        """The cache directory holding the artifacts."""
        return self.kernel.parent


class ImageBuildError(VmmError):
    """Building the guest image failed; ``details`` holds the failing step's output."""


def find_cloud_kernel() -> tuple[str, Path]:
    """The newest installed Debian cloud kernel: ``(version, /boot/vmlinuz-<version>)``
    whose ``/lib/modules/<version>`` exists. Raises ``ImageBuildError`` when none is."""
    found: list[tuple[tuple[int, ...], str, Path]] = []
    for path in Path("/boot").glob("vmlinuz-*-cloud-amd64"):
        version = path.name[len("vmlinuz-") :]
        if (Path("/lib/modules") / version / "modules.dep").is_file():
            key = tuple(int(x) for x in re.findall(r"\d+", version))
            found.append((key, version, path))
    if not found:
        raise ImageBuildError("no Debian cloud kernel installed (apt-get install linux-image-cloud-amd64)")
    found.sort()
    return found[-1][1], found[-1][2]


def debian_mirror() -> str:
    """The first Debian mirror configured for apt (deb822 sources), else deb.debian.org."""
    sources = Path("/etc/apt/sources.list.d/debian.sources")
    try:
        text = sources.read_text()
    except OSError:
        return DEFAULT_MIRROR
    for block in text.split("\n\n"):
        uris = re.search(r"^URIs:\s*(\S+)", block, re.MULTILINE)
        suites = re.search(r"^Suites:\s*(.+)$", block, re.MULTILINE)
        if uris and suites and SUITE in suites.group(1).split():
            return uris.group(1)
    return DEFAULT_MIRROR


def module_load_order(modules_dir: Path, wanted: tuple[str, ...]) -> list[str]:
    """Relative paths (as in ``modules.dep``) of ``wanted`` modules and their
    dependencies, dependencies first. Built-in modules are skipped; unknown ones raise."""
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in (modules_dir / "modules.dep").read_text().splitlines():
        path, _, rest = line.partition(":")
        deps[path] = rest.split()
        name = Path(path).name.split(".ko")[0]
        by_name[name] = path
        by_name[name.replace("-", "_")] = path
    builtin = set()
    builtin_file = modules_dir / "modules.builtin"
    if builtin_file.exists():
        for line in builtin_file.read_text().splitlines():
            name = Path(line).name.split(".ko")[0]
            builtin.update({name, name.replace("-", "_")})
    order: list[str] = []
    seen: set[str] = set()

    def visit(path: str) -> None:
        if path in seen:
            return
        seen.add(path)
        for dep in deps.get(path, []):
            visit(dep)
        order.append(path)

    for name in wanted:
        found = by_name.get(name) or by_name.get(name.replace("-", "_"))
        if found is None:
            if name in builtin or name.replace("-", "_") in builtin:
                continue
            raise ImageBuildError(f"kernel module {name} not found in {modules_dir}")
        visit(found)
    return order


def image_inputs(kernel_version: str, kernel_path: Path, mirror: str) -> dict[str, object]:
    """Everything the image depends on; its canonical JSON hash is the cache key."""
    return {
        "builder_version": BUILDER_VERSION,
        "suite": SUITE,
        "mirror": mirror,
        "packages": sorted(PACKAGES),
        "rootfs_size_mib": ROOTFS_SIZE_MIB,
        "kernel_version": kernel_version,
        "kernel_sha256": sha256_file(kernel_path),
        "modules": list(INITRAMFS_MODULES),
        "busybox_sha256": sha256_file(BUSYBOX),
        "agent_sha256": sha256_file(AGENT_SOURCE),
        "initramfs_init_sha256": hashlib.sha256(INITRAMFS_INIT.encode()).hexdigest(),
        "files_sha256": hashlib.sha256(json.dumps(FILES, sort_keys=True).encode()).hexdigest(),
    }


def _run(
    argv: list[str], *, progress: Callable[[str], None], timeout: float, step: str, cwd: Path | None = None
) -> None:
    progress(f"{step}: {' '.join(argv[:4])}{' ...' if len(argv) > 4 else ''}")
    try:
        proc = subprocess.run(  # noqa: S603
            argv, cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise ImageBuildError(f"{step} timed out after {timeout:.0f}s") from exc
    except FileNotFoundError as exc:
        raise ImageBuildError(f"{step}: {argv[0]} not installed (see requirements/apt-vmm.txt)") from exc
    if proc.returncode != 0:
        out = (proc.stdout + proc.stderr).decode("utf-8", "replace")[-4000:]
        raise ImageBuildError(f"{step} failed (exit {proc.returncode})", details={"output": out})


@contextmanager
def _build_lock(out_dir: Path) -> Iterator[None]:
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / ".build.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _artifacts(directory: Path, digest: str) -> ImageArtifacts:
    return ImageArtifacts(
        kernel=directory / "vmlinuz",
        initramfs=directory / "initramfs.cpio.gz",
        rootfs=directory / "rootfs.ext4",
        digest=digest,
    )


def cached_image(out_dir: Path) -> ImageArtifacts | None:
    """The image for the current inputs if it is already built, without building."""
    version, kernel = find_cloud_kernel()
    digest = _digest(image_inputs(version, kernel, debian_mirror()))
    directory = out_dir / digest
    return _artifacts(directory, digest) if (directory / "manifest.json").is_file() else None


def _digest(inputs: dict[str, object]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def build_image(out_dir: Path, *, progress: Callable[[str], None] = lambda _msg: None) -> ImageArtifacts:
    """Build (or reuse from cache) the default Linux guest image under ``out_dir``.

    Returns the artifact paths. Needs root (debootstrap) and network access to the Debian
    mirror configured for apt. Progress lines go to ``progress``. Raises ``ImageBuildError``.
    """
    out_dir = out_dir.resolve()
    version, kernel = find_cloud_kernel()
    mirror = debian_mirror()
    inputs = image_inputs(version, kernel, mirror)
    digest = _digest(inputs)
    final = out_dir / digest
    # Built images are renamed into place complete: no lock needed to reuse one, so readers
    # never wait behind another image's build.
    if (final / "manifest.json").is_file():
        progress(f"image {digest[:12]} already built")
        return _artifacts(final, digest)
    with _build_lock(out_dir):
        if (final / "manifest.json").is_file():
            progress(f"image {digest[:12]} already built")
            return _artifacts(final, digest)
        started = time.monotonic()
        tmp = out_dir / f".tmp-{digest[:12]}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        for stale in out_dir.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            _build_into(tmp, version=version, kernel=kernel, mirror=mirror, progress=progress)
            manifest = {
                "digest": digest,
                "inputs": inputs,
                "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "build_seconds": round(time.monotonic() - started, 1),
                "files": {
                    p.name: {"bytes": p.stat().st_size, "allocated": p.stat().st_blocks * 512}
                    for p in sorted(tmp.iterdir())
                },
            }
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _update_current_link(out_dir, digest)
        progress(f"image {digest[:12]} built in {time.monotonic() - started:.0f}s at {final}")
        return _artifacts(final, digest)


def _update_current_link(out_dir: Path, digest: str) -> None:
    link_tmp = out_dir / ".current.tmp"
    with suppress(FileNotFoundError):
        link_tmp.unlink()
    link_tmp.symlink_to(digest)
    os.replace(link_tmp, out_dir / "current")


def _build_into(tmp: Path, *, version: str, kernel: Path, mirror: str, progress: Callable[[str], None]) -> None:
    rootfs_dir = tmp / "rootfs.d"
    debootstrap(rootfs_dir, PACKAGES, mirror, progress=progress)
    progress("customising rootfs")
    _customise_rootfs(rootfs_dir)
    make_ext4(rootfs_dir, tmp / "rootfs.ext4", ROOTFS_SIZE_MIB, label="sandbox-root", progress=progress)
    shutil.rmtree(rootfs_dir)
    progress("building initramfs")
    _build_initramfs(tmp / "initramfs.cpio.gz", version, tmp / "initramfs.d")
    shutil.copyfile(kernel, tmp / "vmlinuz")


def debootstrap(root: Path, packages: tuple[str, ...], mirror: str, *, progress: Callable[[str], None]) -> None:
    """``debootstrap --variant=minbase`` of ``SUITE`` with ``packages`` into ``root`` from ``mirror``."""
    _run(
        ["debootstrap", "--variant=minbase", f"--include={','.join(packages)}", SUITE, str(root), mirror],
        progress=progress,
        timeout=DEBOOTSTRAP_TIMEOUT,
        step="debootstrap",
    )


def make_ext4(source: Path, out: Path, size_mib: int, *, label: str, progress: Callable[[str], None]) -> None:
    """A sparse ext4 image of ``size_mib`` holding the tree ``source`` (``mkfs.ext4 -d``, no mount)."""
    with open(out, "wb") as fh:
        fh.truncate(size_mib << 20)
    _run(
        [
            "mkfs.ext4",
            "-q",
            "-F",
            "-L",
            label,
            "-E",
            "lazy_itable_init=1,lazy_journal_init=1",
            "-d",
            str(source),
            str(out),
        ],
        progress=progress,
        timeout=STEP_TIMEOUT,
        step="mkfs.ext4",
    )


def install_files(root: Path, files: dict[str, tuple[str, int]]) -> None:
    """Write ``files`` (path relative to ``root`` -> (text, mode)) into the tree at ``root``,
    replacing what is there (a symlink included)."""
    for rel, (text, mode) in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_symlink() or path.exists():
            path.unlink()
        path.write_text(text)
        os.chmod(path, mode)


def _customise_rootfs(root: Path) -> None:
    install_files(root, FILES)
    agent = root / AGENT_IN_IMAGE
    shutil.copyfile(AGENT_SOURCE, agent)
    os.chmod(agent, 0o755)  # noqa: S103 - executables in the guest image
    # Bytecode from the guest's own Python (its magic number), in __pycache__ where the import
    # in run-agent finds it; without it every boot would compile the agent again.
    _run(
        ["chroot", str(root), "/usr/bin/python3", "-I", "-S", "-m", "py_compile", "/" + AGENT_IN_IMAGE],
        progress=lambda _msg: None,
        timeout=STEP_TIMEOUT,
        step="compiling the agent",
    )
    bb = root / "usr/local/bin/busybox"
    shutil.copyfile(BUSYBOX, bb)
    os.chmod(bb, 0o755)  # noqa: S103 - executables in the guest image
    # /sbin is a symlink to usr/sbin (merged /usr); a relative link resolves both inside
    # the guest and from the initramfs (where the root is mounted on /newroot).
    sbin = (root / "sbin").resolve()
    init = sbin / "init"
    if init.exists() or init.is_symlink():
        init.unlink()
    init.symlink_to(os.path.relpath(root / "usr/local/bin/busybox", sbin))
    passwordless_root(root)
    trim_rootfs(root)


def passwordless_root(root: Path) -> None:
    """Root without password on the serial console (the host controls console access)."""
    shadow = root / "etc/shadow"
    lines = shadow.read_text().splitlines()
    shadow.write_text("\n".join(re.sub(r"^root:[^:]*:", "root::", ln) for ln in lines) + "\n")


def trim_rootfs(root: Path) -> None:
    """Remove what a sandbox does not need (apt caches and lists, docs, locales); keeps the image small."""
    for rel in (
        "var/cache/apt/archives",
        "var/lib/apt/lists",
        "usr/share/doc",
        "usr/share/man",
        "usr/share/info",
        "usr/share/locale",
        "var/log/bootstrap.log",
    ):
        target = root / rel
        if target.is_dir():
            for child in target.iterdir():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                elif child.name not in ("lock", "partial"):
                    child.unlink()
        elif target.exists():
            target.unlink()


def _build_initramfs(out: Path, version: str, work: Path) -> None:
    modules_dir = Path("/lib/modules") / version
    order = module_load_order(modules_dir, INITRAMFS_MODULES)
    (work / "bin").mkdir(parents=True)
    (work / "lib/modules").mkdir(parents=True)
    for d in ("proc", "sys", "dev", "newroot", "sbin", "usr/bin", "usr/sbin"):
        (work / d).mkdir(parents=True, exist_ok=True)
    shutil.copyfile(BUSYBOX, work / "bin/busybox")
    os.chmod(work / "bin/busybox", 0o755)  # noqa: S103 - executables in the guest image
    (work / "bin/sh").symlink_to("busybox")
    init = work / "init"
    init.write_text(INITRAMFS_INIT)
    os.chmod(init, 0o755)  # noqa: S103 - executables in the guest image
    names: list[str] = []
    for rel in order:
        src = modules_dir / rel
        name = Path(rel).name
        if name.endswith(".ko.xz") or name.endswith(".ko.zst") or name.endswith(".ko.gz"):
            raise ImageBuildError(f"compressed kernel module {rel} not supported by busybox insmod here")
        shutil.copyfile(src, work / "lib/modules" / name)
        names.append(name)
    (work / "lib/modules/load.order").write_text("\n".join(names) + "\n")
    files = sorted(str(p.relative_to(work)) for p in work.rglob("*"))
    proc = subprocess.run(  # noqa: S603
        ["cpio", "--quiet", "-o", "-H", "newc", "--owner=0:0", "--reproducible"],
        input=("\n".join(["."] + files) + "\n").encode(),
        cwd=work,
        capture_output=True,
        timeout=STEP_TIMEOUT,
        check=False,
    )
    if proc.returncode != 0:
        raise ImageBuildError("cpio failed", details={"output": proc.stderr.decode("utf-8", "replace")})
    with gzip.GzipFile(out, "wb", compresslevel=6, mtime=0) as fh:
        fh.write(proc.stdout)
    shutil.rmtree(work)


def main(argv: list[str] | None = None) -> int:
    """CLI: ``python -m vms.vmm.image OUT_DIR`` builds (or reuses) the image and prints its paths."""
    parser = argparse.ArgumentParser(
        prog="python -m vms.vmm.image", description=__doc__.split("\n")[0] if __doc__ else None
    )
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--json", action="store_true", help="print the artifact paths as JSON")
    args = parser.parse_args(argv)
    started = time.monotonic()
    try:
        art = build_image(
            args.out_dir,
            progress=lambda msg: print(f"[{time.monotonic() - started:6.1f}s] {msg}", file=sys.stderr, flush=True),
        )
    except ImageBuildError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        if isinstance(exc.details, dict) and exc.details.get("output"):
            print(exc.details["output"], file=sys.stderr)
        return 1
    result = {
        "kernel": str(art.kernel),
        "initramfs": str(art.initramfs),
        "rootfs": str(art.rootfs),
        "digest": art.digest,
    }
    print(json.dumps(result) if args.json else "\n".join(f"{k}: {v}" for k, v in result.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
