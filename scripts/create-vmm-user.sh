#!/usr/bin/env bash
# Creates the unprivileged system user VMMs run as (SANDBOX_VMM_USER, default msbx-vmm), member of
# group kvm for /dev/kvm where KVM is used (root only; does nothing when it exists already).
# SANDBOX_VMM_USER= (empty) runs VMMs as the caller instead: nothing to create.
set -euo pipefail
user=${SANDBOX_VMM_USER-msbx-vmm}
[ -n "$user" ] || exit 0
if ! getent passwd "$user" >/dev/null; then
  if [ "$(id -u)" != 0 ]; then
    echo "The VMM user $user does not exist (run as root to create it, or set SANDBOX_VMM_USER=)" >&2
    exit 1
  fi
  echo "Creating the VMM system user $user"
  useradd --system --user-group --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin "$user"
fi
getent group kvm >/dev/null || { [ "$(id -u)" != 0 ] || groupadd --system kvm; }
if [ "$(id -u)" = 0 ] && ! id -nG "$user" | tr ' ' '\n' | grep -qx kvm; then
  usermod -a -G kvm "$user"
fi
