#!/usr/bin/env bash
# Runs the host daemon (agent and console connections), the web server (daphne), a Celery worker
# for this host's queue and the shared queue, and Celery beat, in the foreground; Ctrl-C stops them (running VMs keep running).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin
HOST_NAME=${SANDBOX_HOST_NAME:-local}
BIND=${BIND:-127.0.0.1}
PORT=${PORT:-8000}
mkdir -p var/log
# VM networking (bridges, TAPs, nftables, VMMs) stays in a namespace of its own unless
# SANDBOX_NETNS is set; SANDBOX_NETNS= (empty) means the host namespace, for real hosts.
if [ -z "${SANDBOX_NETNS+set}" ]; then
    export SANDBOX_NETNS=msbx-local
    [ -e /run/netns/$SANDBOX_NETNS ] || { ip netns add $SANDBOX_NETNS && ip -n $SANDBOX_NETNS link set lo up; }
fi
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM
$PY/celery -A sandbox_site worker -Q "shared,host.$HOST_NAME" -n "worker@$HOST_NAME" --concurrency 4 -l INFO >>var/log/worker.log 2>&1 &
pids+=($!)
$PY/celery -A sandbox_site beat -s var/celerybeat-schedule -l INFO >>var/log/beat.log 2>&1 &
pids+=($!)
$PY/python manage.py hostd >>var/log/hostd.log 2>&1 &
pids+=($!)
$PY/daphne -b "$BIND" -p "$PORT" sandbox_site.asgi:application >>var/log/web.log 2>&1 &
pids+=($!)
sleep 2
echo
echo "microvm-sandbox is running: http://$BIND:$PORT/  (API docs: http://$BIND:$PORT/api/docs/)"
echo "Logs in var/log/. Press Ctrl-C to stop (VMs keep running; they are re-attached on the next start)."
wait -n "${pids[@]}"
