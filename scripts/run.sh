#!/usr/bin/env bash
# Runs the host daemon (agent and console connections), the web server (daphne, WEB_PROCESSES of them), a Celery worker
# for this host's queue and the shared queue, and Celery beat, in the foreground; Ctrl-C stops them (running VMs keep running).
# Without REDIS_URL it first starts a private Redis (Debian's redis-server) on a Unix socket
# (SANDBOX_REDIS_SOCKET, default var/redis.sock; no TCP port, nothing saved to disk) for the
# channel layer, the cache and Celery's broker, and stops it with the rest. Logs go to
# <SANDBOX_DATA_DIR>/log (var/log), each file capped at SANDBOX_LOG_MAX_BYTES with
# SANDBOX_LOG_BACKUPS rotated copies (scripts/logpipe.py).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin
HOST_NAME=${SANDBOX_HOST_NAME:-local}
BIND=${BIND:-127.0.0.1}
PORT=${PORT:-8000}
# Paths as the settings see them (environment, .env, defaults), so that the processes below and
# manage.py commands run by hand agree on them; and whether REDIS_URL is set there.
paths=$($PY/python -c 'import os; from sandbox_site import settings as s
print(s.DATA_DIR.absolute()); print(s.SANDBOX_REDIS_SOCKET.absolute()); print("own" if os.environ.get("REDIS_URL") else "private")
print(s.SANDBOX_LOG_MAX_BYTES); print(s.SANDBOX_LOG_BACKUPS); print(s.WEB_PROCESSES)')
DATA_DIR=$(sed -n 1p <<<"$paths")
REDIS_SOCKET=$(sed -n 2p <<<"$paths")
REDIS_KIND=$(sed -n 3p <<<"$paths")
LOG_MAX_BYTES=$(sed -n 4p <<<"$paths")
LOG_BACKUPS=$(sed -n 5p <<<"$paths")
WEB_PROCESSES=$(sed -n 6p <<<"$paths")
LOG_DIR=$DATA_DIR/log
mkdir -p "$LOG_DIR"
# VM networking (bridges, TAPs, nftables, VMMs) stays in a namespace of its own unless
# SANDBOX_NETNS is set; SANDBOX_NETNS= (empty) means the host namespace, for real hosts.
if [ -z "${SANDBOX_NETNS+set}" ]; then
    export SANDBOX_NETNS=msbx-local
    [ -e /run/netns/$SANDBOX_NETNS ] || { ip netns add $SANDBOX_NETNS && ip -n $SANDBOX_NETNS link set lo up; }
fi
# Each process writes through a rotating pipe (a process substitution: $! stays the process's
# pid); the pipe ends when the process closes its output.
logto() { $PY/python scripts/logpipe.py "$LOG_DIR/$1.log" --max-bytes "$LOG_MAX_BYTES" --backups "$LOG_BACKUPS"; }
pids=()
redis_pid=
cleanup() {
    kill "${pids[@]}" 2>/dev/null || true
    wait "${pids[@]}" 2>/dev/null || true
    # Redis last: the others may still publish while they stop.
    [ -z "$redis_pid" ] || { kill "$redis_pid" 2>/dev/null || true; wait "$redis_pid" 2>/dev/null || true; }
}
trap cleanup EXIT INT TERM
if [ "$REDIS_KIND" = private ]; then
    export SANDBOX_REDIS_SOCKET=$REDIS_SOCKET
    mkdir -p "$(dirname "$REDIS_SOCKET")"
    if redis-cli -s "$REDIS_SOCKET" ping >/dev/null 2>&1; then
        echo "Another Redis already answers on $REDIS_SOCKET (is make run already running?)" >&2
        exit 1
    fi
    rm -f "$REDIS_SOCKET"
    # Events, cache entries and queued tasks only: no snapshots or AOF (tasks whose message is
    # lost are re-run by reconcile), and a memory bound that evicts only keys with a TTL
    # (channel messages, cache), never queued tasks.
    redis-server --port 0 --unixsocket "$REDIS_SOCKET" --unixsocketperm 700 \
        --save "" --appendonly no --dir "$(dirname "$REDIS_SOCKET")" \
        --maxmemory 256mb --maxmemory-policy volatile-lru \
        --logfile "" --daemonize no > >(logto redis) 2>&1 &
    redis_pid=$!
    for _ in $(seq 1 50); do redis-cli -s "$REDIS_SOCKET" ping >/dev/null 2>&1 && break; sleep 0.1; done
    redis-cli -s "$REDIS_SOCKET" ping >/dev/null || { echo "Redis did not start; see $LOG_DIR/redis.log" >&2; exit 1; }
fi
$PY/celery -A sandbox_site worker -Q "shared,host.$HOST_NAME" -n "worker@$HOST_NAME" --concurrency 4 -l INFO > >(logto worker) 2>&1 &
pids+=($!)
$PY/celery -A sandbox_site beat -s "$DATA_DIR/celerybeat-schedule" -l INFO > >(logto beat) 2>&1 &
pids+=($!)
$PY/python manage.py hostd > >(logto hostd) 2>&1 &
pids+=($!)
# WEB_PROCESSES daphne processes on one socket (0: one per CPU but one, 1-4; scripts/web.py).
$PY/python scripts/web.py --bind "$BIND" --port "$PORT" --processes "$WEB_PROCESSES" > >(logto web) 2>&1 &
web_pid=$!
pids+=($web_pid)
# Say "running" once the web server accepts connections (it takes seconds to import everything),
# so that the address printed below answers when opened at once; bounded to about 2 minutes.
case $BIND in 0.0.0.0) probe=127.0.0.1 ;; ::) probe=::1 ;; *) probe=$BIND ;; esac
up=no
for _ in $(seq 1 240); do
    (exec 3<>"/dev/tcp/$probe/$PORT") 2>/dev/null && { up=yes; break; }
    kill -0 "$web_pid" 2>/dev/null || { echo "The web server stopped; see $LOG_DIR/web.log" >&2; exit 1; }
    sleep 0.5
done
[ "$up" = yes ] || echo "The web server does not answer on $probe:$PORT yet; see $LOG_DIR/web.log" >&2
echo
echo "microvm-sandbox is running: http://$BIND:$PORT/  (API docs: http://$BIND:$PORT/api/docs/)"
echo "Logs in $LOG_DIR/. Press Ctrl-C to stop (VMs keep running; they are re-attached on the next start)."
wait -n "${pids[@]}" ${redis_pid:+"$redis_pid"}
