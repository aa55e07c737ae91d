"""What the host runs inside a guest (through its agent) to configure a NIC. No Django: the
real-VM tests run it too."""

from __future__ import annotations

# $1: the NIC's MAC, $2: <ip>/<prefix>, $3: <ip6>/<prefix6> or "", $4: IPv6 gateway for the
# default route or "". Finds the interface by MAC (a hot-plugged one may take a
# moment to appear: 20 looks 0.5 s apart; shell built-ins only, as forks are slow under TCG),
# brings it up, sets the static address; idempotent.
NIC_CONFIGURE_SCRIPT = r"""mac="$1"; addr="$2"; dev=""; i=0
while [ -z "$dev" ] && [ "$i" -lt 20 ]; do
    for d in /sys/class/net/*; do
        a=""; read -r a < "$d/address" 2>/dev/null
        [ "$a" = "$mac" ] && dev="${d##*/}"
    done
    [ -n "$dev" ] || { sleep 0.5; i=$((i + 1)); }
done
[ -n "$dev" ] || { echo "no interface with MAC $mac" >&2; exit 3; }
ip link set "$dev" up && ip addr replace "$addr" dev "$dev" || exit 4
if [ -n "$3" ]; then ip -6 addr replace "$3" dev "$dev" nodad || exit 5; fi
if [ -n "$4" ]; then ip -6 route replace default via "$4" dev "$dev" || exit 6; fi
echo "$dev $addr $3"
"""


def nic_configure_argv(mac: str, address: str, address6: str = "", gateway6: str = "") -> list[str]:
    """The exec argv for one NIC: values are arguments, never part of the script."""
    return ["/bin/sh", "-c", NIC_CONFIGURE_SCRIPT, "sh", mac, address, address6, gateway6]
