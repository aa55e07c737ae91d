"""One script that runs guest_agents/linux/install.sh against fresh directory layouts and
checks what it wrote; run on the host (test_agent_installer.py) and inside a VM
(test_uefi_vm.py), so both see the same checks. Prints ``INSTALLER-OK`` at the end."""

from __future__ import annotations

INSTALLER_CHECKS = r"""
set -eu
src=$1      # directory holding install.sh, sandbox_agent.py, sandbox-agent.service
work=$2     # fresh scratch directory
inst="sh $src/install.sh"
agent_sum=$(sha256sum "$src/sandbox_agent.py" | cut -d' ' -f1)
fail() { echo "FAIL: $*"; exit 1; }

check_files() {  # $1 = destdir, $2 = prefix
    f="$1$2/lib/sandbox/sandbox_agent.py"
    [ -x "$f" ] || fail "agent missing in $1$2"
    [ "$(sha256sum "$f" | cut -d' ' -f1)" = "$agent_sum" ] || fail "agent differs"
    grep -q "python3 -u $2/lib/sandbox/sandbox_agent.py" "$1$2/lib/sandbox/run-agent" || fail "run-agent"
}

# systemd layout (auto-detected from lib/systemd/systemd), custom prefix
d=$work/systemd; mkdir -p $d/lib/systemd; touch $d/lib/systemd/systemd
$inst --destdir $d --prefix /opt/sbx
check_files $d /opt/sbx
u=$d/etc/systemd/system/sandbox-agent.service
grep -qx "ExecStart=/usr/bin/python3 -u -m sandbox_agent" $u || fail "unit ExecStart"
grep -qx "Environment=PYTHONPATH=/opt/sbx/lib/sandbox" $u || fail "unit PYTHONPATH"
grep -qx "Restart=always" $u || fail "unit Restart"
[ "$(readlink $d/etc/systemd/system/multi-user.target.wants/sandbox-agent.service)" = ../sandbox-agent.service ] \
    || fail "unit not enabled"
! grep -q "@PREFIX@\|@PYTHON@" $u || fail "placeholders left"

# OpenRC layout (Alpine)
d=$work/openrc; mkdir -p $d/sbin; touch $d/sbin/openrc-run
$inst --destdir $d
check_files $d /usr/local
head -1 $d/etc/init.d/sandbox-agent | grep -qx '#!/sbin/openrc-run' || fail "openrc script"
grep -qx 'supervisor=supervise-daemon' $d/etc/init.d/sandbox-agent || fail "openrc supervisor"
[ "$(readlink $d/etc/runlevels/default/sandbox-agent)" = /etc/init.d/sandbox-agent ] || fail "runlevel"

# busybox init: one respawn line, however often the installer runs
d=$work/busybox; mkdir -p $d/etc; printf '::sysinit:/etc/rc\nttyS0::respawn:/bin/sh\n' > $d/etc/inittab
$inst --destdir $d; $inst --destdir $d
check_files $d /usr/local
[ "$(grep -c '^::respawn:/usr/local/lib/sandbox/run-agent$' $d/etc/inittab)" = 1 ] || fail "busybox inittab"

# sysvinit inittab syntax
d=$work/sysv; mkdir -p $d/etc; printf 'id:2:initdefault:\n' > $d/etc/inittab
$inst --destdir $d --init inittab
grep -qx 'sbx:2345:respawn:/usr/local/lib/sandbox/run-agent' $d/etc/inittab || fail "sysv inittab"

# no init system: files only
d=$work/none; mkdir -p $d
$inst --destdir $d --init none
check_files $d /usr/local
[ ! -e $d/etc ] || fail "none wrote /etc"

# uninstall leaves the layouts as they were
$inst --destdir $work/systemd --prefix /opt/sbx --uninstall
[ ! -e $work/systemd/opt/sbx/lib/sandbox ] && [ ! -e $work/systemd/etc/systemd/system/sandbox-agent.service ] \
    || fail "uninstall systemd"
$inst --destdir $work/busybox --uninstall
! grep -q run-agent $work/busybox/etc/inittab || fail "uninstall inittab"
grep -q '^::sysinit:/etc/rc$' $work/busybox/etc/inittab || fail "uninstall removed other lines"

# bad input is refused
if $inst --destdir $work/missing 2>/dev/null; then fail "missing destdir accepted"; fi
if $inst --prefix relative --destdir $work/none 2>/dev/null; then fail "relative prefix accepted"; fi
echo INSTALLER-OK
"""
