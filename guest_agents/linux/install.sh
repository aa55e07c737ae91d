#!/bin/sh
# Install the microvm-sandbox guest agent on a Linux system: into this system, or into an
# image mounted or unpacked at --destdir. POSIX sh; needs python3 (3.7+) in the guest.
#
#   install.sh [--destdir DIR] [--prefix /usr/local] [--init auto|systemd|openrc|inittab|none]
#              [--python /usr/bin/python3] [--no-start] [--uninstall]
#
# Writes  <prefix>/lib/sandbox/sandbox_agent.py and <prefix>/lib/sandbox/run-agent, then
# registers a service with the init system found (or named by --init):
#   systemd  /etc/systemd/system/sandbox-agent.service, enabled (wants symlink)
#   openrc   /etc/init.d/sandbox-agent (supervise-daemon respawns it), in runlevel default
#   inittab  a respawn line in /etc/inittab (busybox init or sysvinit)
#   none     files only: start <prefix>/lib/sandbox/run-agent from your own init
# Idempotent: running it again replaces the files and never duplicates a registration.
# With an empty --destdir on a running systemd/OpenRC system the service is started too.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
destdir=""
prefix=/usr/local
init=auto
python=/usr/bin/python3
start=yes
action=install
agent_src=${SANDBOX_AGENT_SOURCE:-$here/sandbox_agent.py}
unit_src=${SANDBOX_AGENT_UNIT:-$here/sandbox-agent.service}

die() { echo "install.sh: $*" >&2; exit 1; }
say() { echo "install.sh: $*"; }

while [ $# -gt 0 ]; do
    case "$1" in
        --destdir) destdir=${2%/}; shift 2 ;;
        --destdir=*) destdir=${1#*=}; destdir=${destdir%/}; shift ;;
        --prefix) prefix=${2%/}; shift 2 ;;
        --prefix=*) prefix=${1#*=}; prefix=${prefix%/}; shift ;;
        --init) init=$2; shift 2 ;;
        --init=*) init=${1#*=}; shift ;;
        --python) python=$2; shift 2 ;;
        --python=*) python=${1#*=}; shift ;;
        --no-start) start=no; shift ;;
        --uninstall) action=uninstall; shift ;;
        -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
done

case "$prefix" in /*) ;; *) die "--prefix must be absolute" ;; esac
[ -z "$destdir" ] || [ -d "$destdir" ] || die "--destdir $destdir is not a directory"
libdir=$prefix/lib/sandbox
root=$destdir

detect_init() {
    if [ -z "$root" ] && [ -d /run/systemd/system ]; then echo systemd; return; fi
    if [ -n "$root" ] && { [ -e "$root/lib/systemd/systemd" ] || [ -e "$root/usr/lib/systemd/systemd" ]; }; then
        echo systemd; return
    fi
    if [ -e "$root/sbin/openrc-run" ] || [ -e "$root/usr/sbin/openrc-run" ] || [ -e "$root/sbin/openrc" ]; then
        echo openrc; return
    fi
    if [ -f "$root/etc/inittab" ]; then echo inittab; return; fi
    echo none
}

[ "$init" = auto ] && init=$(detect_init)
case "$init" in systemd|openrc|inittab|none) ;; *) die "unknown init system $init" ;; esac

live=no  # the service manager of this very system can be told (no --destdir)
[ -z "$root" ] && [ "$start" = yes ] && live=yes

inittab_line() {
    # busybox init: "::respawn:cmd"; sysvinit: "id:runlevels:respawn:cmd".
    if grep -q '^::' "$root/etc/inittab" 2>/dev/null; then
        echo "::respawn:$libdir/run-agent"
    else
        echo "sbx:2345:respawn:$libdir/run-agent"
    fi
}

uninstall() {
    case "$init" in
        systemd)
            [ "$live" = yes ] && command -v systemctl >/dev/null && systemctl disable --now sandbox-agent.service || true
            rm -f "$root/etc/systemd/system/multi-user.target.wants/sandbox-agent.service" \
                "$root/etc/systemd/system/sandbox-agent.service" ;;
        openrc)
            [ "$live" = yes ] && command -v rc-service >/dev/null && rc-service sandbox-agent stop || true
            rm -f "$root/etc/runlevels/default/sandbox-agent" "$root/etc/init.d/sandbox-agent" ;;
        inittab)
            if [ -f "$root/etc/inittab" ]; then
                grep -v "$libdir/run-agent" "$root/etc/inittab" > "$root/etc/inittab.sbx-tmp" || true
                mv "$root/etc/inittab.sbx-tmp" "$root/etc/inittab"
            fi ;;
    esac
    rm -rf "$root$libdir"
    say "removed the agent from ${root:-/}"
}

if [ "$action" = uninstall ]; then uninstall; exit 0; fi

[ -r "$agent_src" ] || die "agent source $agent_src not found (keep install.sh next to sandbox_agent.py)"
if [ -z "$root" ] && ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 7))' 2>/dev/null; then
    die "$python is missing or older than 3.7 (apt-get install python3 / dnf install python3 / apk add python3)"
fi
[ -n "$root" ] && [ ! -e "$root$python" ] && say "warning: $python not found in $root (install python3 there)"

mkdir -p "$root$libdir"
cp "$agent_src" "$root$libdir/sandbox_agent.py.sbx-tmp"
chmod 0755 "$root$libdir/sandbox_agent.py.sbx-tmp"
mv "$root$libdir/sandbox_agent.py.sbx-tmp" "$root$libdir/sandbox_agent.py"
# Byte code for a faster start (the systemd unit runs the agent as a module, which uses it);
# into an image only when its python can run here (chroot). Optional: Python compiles anyway.
rm -rf "$root$libdir/__pycache__"
if [ -z "$root" ]; then
    "$python" -m py_compile "$libdir/sandbox_agent.py" 2>/dev/null || true
elif [ "$(id -u)" = 0 ] && [ -x "$root$python" ] && command -v chroot >/dev/null; then
    chroot "$root" "$python" -m py_compile "$libdir/sandbox_agent.py" 2>/dev/null || true
fi
cat > "$root$libdir/run-agent.sbx-tmp" <<RUN
#!/bin/sh
# Started (and restarted) by the init system; the sleep throttles a crash loop.
log=/var/log/sandbox-agent.log
[ -f \$log ] && [ "\$(wc -c < \$log)" -gt 1048576 ] && mv -f \$log \$log.1
$python -u $libdir/sandbox_agent.py >>\$log 2>&1
sleep 1
RUN
chmod 0755 "$root$libdir/run-agent.sbx-tmp"
mv "$root$libdir/run-agent.sbx-tmp" "$root$libdir/run-agent"
say "agent installed in $root$libdir"

case "$init" in
    systemd)
        [ -r "$unit_src" ] || die "unit file $unit_src not found"
        mkdir -p "$root/etc/systemd/system/multi-user.target.wants"
        sed -e "s|@PREFIX@|$prefix|g" -e "s|@PYTHON@|$python|g" "$unit_src" > "$root/etc/systemd/system/sandbox-agent.service"
        chmod 0644 "$root/etc/systemd/system/sandbox-agent.service"
        ln -sf ../sandbox-agent.service "$root/etc/systemd/system/multi-user.target.wants/sandbox-agent.service"
        if [ "$live" = yes ] && command -v systemctl >/dev/null; then
            systemctl daemon-reload && systemctl restart sandbox-agent.service
        fi
        say "systemd unit sandbox-agent.service enabled" ;;
    openrc)
        mkdir -p "$root/etc/init.d" "$root/etc/runlevels/default"
        cat > "$root/etc/init.d/sandbox-agent" <<RC
#!/sbin/openrc-run
description="microvm-sandbox guest agent"
supervisor=supervise-daemon
command="$python"
command_args="-u $libdir/sandbox_agent.py"
output_log=/var/log/sandbox-agent.log
error_log=/var/log/sandbox-agent.log
respawn_delay=1
respawn_max=0

depend() {
    after localmount
}
RC
        chmod 0755 "$root/etc/init.d/sandbox-agent"
        ln -sf /etc/init.d/sandbox-agent "$root/etc/runlevels/default/sandbox-agent"
        if [ "$live" = yes ] && command -v rc-service >/dev/null; then rc-service sandbox-agent restart; fi
        say "OpenRC service sandbox-agent added to runlevel default" ;;
    inittab)
        line=$(inittab_line)
        if ! grep -qF "$libdir/run-agent" "$root/etc/inittab"; then
            echo "$line" >> "$root/etc/inittab"
        fi
        if [ "$live" = yes ]; then kill -HUP 1 2>/dev/null || true; fi
        say "inittab respawns $libdir/run-agent" ;;
    none)
        say "no init system registered: start $libdir/run-agent from yours" ;;
esac
