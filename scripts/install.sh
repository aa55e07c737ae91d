#!/usr/bin/env bash
# Install microvm-sandbox as systemd services on a Debian 12 host, from this checkout
# (docs/operations.md). Run as root; safe to run again (upgrades keep the env file and data).
#
#   scripts/install.sh                      # everything on this host, host name "local"
#   SANDBOX_HOST_NAME=hv1 scripts/install.sh
#
# What it does: the Debian packages (requirements/apt*.txt); a system user (msbx) for the web
# process and beat; the code in $PREFIX with a virtualenv from requirements/lock.txt; the env
# file $ETC/env (created once, with a fresh SECRET_KEY and PostgreSQL/Redis on this host); the
# data directory $DATA; the units of deploy/systemd in /etc/systemd/system; then migrations,
# static files, the guest image and `systemctl enable --now msbx.target`.
# Set MSBX_NO_START=1 to install without starting, MSBX_NO_APT=1 to skip the packages.
# MSBX_KSM=1 also turns on the kernel's same-page merging for this whole host, now and at every
# boot (a tmpfiles.d entry; docs/operations.md "Host tuning"); MSBX_KSM=0 removes that entry
# and turns it off again.
set -euo pipefail
cd "$(dirname "$0")/.."
SRC=$(pwd)
PREFIX=${MSBX_PREFIX:-/opt/microvm-sandbox}
ETC=${MSBX_ETC:-/etc/microvm-sandbox}
DATA=${MSBX_DATA:-/var/lib/microvm-sandbox}
USER_NAME=${MSBX_USER:-msbx}
HOST_NAME=${SANDBOX_HOST_NAME:-local}
UNIT_DIR=${MSBX_UNIT_DIR:-/etc/systemd/system}

[ "$(id -u)" = 0 ] || { echo "run as root" >&2; exit 1; }

# render SRC DEST: fill in the unit templates' placeholders.
render() {
    sed -e "s|@PREFIX@|$PREFIX|g" -e "s|@ETC@|$ETC|g" -e "s|@DATA@|$DATA|g" \
        -e "s|@USER@|$USER_NAME|g" -e "s|@GROUP@|$USER_NAME|g" "$1" > "$2"
}

if [ -z "${MSBX_NO_APT:-}" ]; then
    ./scripts/install-system-packages.sh
fi
getent group "$USER_NAME" >/dev/null || groupadd --system "$USER_NAME"
getent passwd "$USER_NAME" >/dev/null || \
    useradd --system --gid "$USER_NAME" --home-dir "$DATA" --shell /usr/sbin/nologin "$USER_NAME"

# The code: a copy of the checkout (without local state), owned by root, readable by the group.
mkdir -p "$PREFIX"
tar -C "$SRC" --exclude=./.venv --exclude=./var --exclude=./test-artifacts --exclude=./.git \
    --exclude=./frontend/node_modules -cf - . | tar -C "$PREFIX" -xf -
[ -x "$PREFIX/.venv/bin/python" ] || python3 -m venv "$PREFIX/.venv"
"$PREFIX/.venv/bin/pip" install -q -r "$PREFIX/requirements/lock.txt"
"$PREFIX/.venv/bin/pip" install -q --no-deps -e "$PREFIX"
chmod -R go-w "$PREFIX"

# Data: root-owned, the group may enter (the web process reads images, reaches hostd's socket).
install -d -m 0750 -o root -g "$USER_NAME" "$DATA" "$DATA/run" "$DATA/images" "$DATA/snapshots"
install -d -m 0770 -o root -g "$USER_NAME" "$DATA/static" "$DATA/log"

install -d -m 0750 -o root -g "$USER_NAME" "$ETC"
if [ ! -e "$ETC/env" ]; then
    # PostgreSQL on this host: a role and database named after the user, peer-less TCP login.
    db_password=$(python3 -c 'import secrets; print(secrets.token_urlsafe(24))')
    if command -v psql >/dev/null && systemctl is-active --quiet postgresql 2>/dev/null; then
        su postgres -c "psql -q -c \"CREATE ROLE $USER_NAME LOGIN PASSWORD '$db_password'\"" 2>/dev/null || true
        su postgres -c "createdb -O $USER_NAME microvm_sandbox" 2>/dev/null || true
    fi
    umask 027
    cat > "$ETC/env" <<ENV
# microvm-sandbox settings (docs/configuration.md). Read by every unit and by manage.py.
SECRET_KEY=$(python3 -c 'import secrets; print(secrets.token_urlsafe(50))')
DATABASE_URL=postgres://$USER_NAME:$db_password@127.0.0.1:5432/microvm_sandbox
REDIS_URL=redis://127.0.0.1:6379/0
SANDBOX_DATA_DIR=$DATA
SANDBOX_NETNS=
SANDBOX_HOSTD_SOCKET_GROUP=$USER_NAME
ALLOWED_HOSTS=localhost,127.0.0.1,$(hostname -f 2>/dev/null || hostname)
BIND=127.0.0.1
PORT=8000
ENV
    umask 022
    chgrp "$USER_NAME" "$ETC/env"
fi

for unit in deploy/systemd/*; do
    render "$unit" "$UNIT_DIR/$(basename "$unit")"
done
systemctl daemon-reload 2>/dev/null || true

# Host tuning, host-wide, so only when the operator asks for it (docs/operations.md).
KSM_CONF=/etc/tmpfiles.d/microvm-sandbox-ksm.conf
case "${MSBX_KSM:-}" in
    1)
        cat > "$KSM_CONF" <<'KSM'
# microvm-sandbox (scripts/install.sh MSBX_KSM=1): merge identical pages of the guests' RAM
# (QEMU offers it with mem-merge=on). docs/operations.md "Host tuning".
w /sys/kernel/mm/ksm/run - - - - 1
KSM
        systemd-tmpfiles --create "$KSM_CONF" ;;
    0)
        rm -f "$KSM_CONF"
        echo 0 > /sys/kernel/mm/ksm/run ;;
esac

manage() { (cd "$PREFIX" && SANDBOX_ENV_FILE="$ETC/env" "$PREFIX/.venv/bin/python" manage.py "$@"); }
manage migrate --noinput
manage collectstatic --noinput -v 0
manage build_image
chgrp -R "$USER_NAME" "$DATA/static" "$DATA/images" 2>/dev/null || true

systemctl enable msbx.target msbx-hostd.service msbx-web.service msbx-beat.service "msbx-worker@$HOST_NAME.service"
if [ -z "${MSBX_NO_START:-}" ]; then
    systemctl restart msbx.target msbx-hostd.service "msbx-worker@$HOST_NAME.service" msbx-web.service msbx-beat.service
fi
echo "Installed. Create the first admin: (cd $PREFIX && SANDBOX_ENV_FILE=$ETC/env .venv/bin/python manage.py bootstrap_admin)"
