#!/usr/bin/env bash
# `make cluster`: the topology of compose.cluster.yaml on this machine, without containers:
# redis-server + 3 rnnserve replicas on loopback ports + nginx in front (grpc_pass, hash on
# x-session-id). Runs in the foreground; Ctrl-C (or SIGTERM) stops everything it started,
# and any replica started again with `restart`.
#
#   bash scripts/cluster.sh              start the cluster (make cluster)
#   bash scripts/cluster.sh restart N    start replica N again after it died, e.g. after
#                                        kill -9 "$(cat "$DIR/replica2.pid")"
#                                        (make cluster-restart REPLICA=2; same settings)
#
#   rnnserve --address 127.0.0.1:$PORT health            # through nginx (default port 50051)
#
# Settings (environment): CLUSTER_DIR (state: redis data, shared checkpoints, logs, pid files;
# default ./cluster-data), PORT (nginx, 50051), REDIS_PORT (6390), REPLICA_BASE_PORT (50061: the
# replicas use 50061-50063), METRICS_BASE_PORT (9091: 9091-9093), SERVER (rnnserve-server).
set -euo pipefail
cd "$(dirname "$0")/.."

DIR=$(realpath -m "${CLUSTER_DIR:-cluster-data}")
PORT=${PORT:-50051}
REDIS_PORT=${REDIS_PORT:-6390}
REPLICA_BASE_PORT=${REPLICA_BASE_PORT:-50061}
METRICS_BASE_PORT=${METRICS_BASE_PORT:-9091}
SERVER=${SERVER:-.venv/bin/rnnserve-server}
REPLICAS=3
REDIS_URL="redis://127.0.0.1:$REDIS_PORT/0"

die() {
  echo "cluster: $*" >&2
  exit 1
}

REDIS_BIN=$(command -v redis-server || true)
NGINX_BIN=$(command -v nginx || echo /usr/sbin/nginx)
[ -n "$REDIS_BIN" ] && [ -x "$NGINX_BIN" ] || die "redis-server and nginx are needed: run 'make deps'"
[ -x "$SERVER" ] || command -v "$SERVER" >/dev/null || die "$SERVER not found: run 'make install'"
"$SERVER" --help | grep -q -- '--redis-url' \
  || die "this rnnserve-server has no cluster flags (--redis-url, --shared-dir, --advertise-address) yet"

replica_port() { echo $((REPLICA_BASE_PORT + $1 - 1)); }
metrics_port() { echo $((METRICS_BASE_PORT + $1 - 1)); }

# True if something accepts connections on 127.0.0.1:port.
listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Fail before starting anything if a port is taken (nginx would only log its bind error).
require_free() { # port what variable
  if listening "$1"; then
    die "port $1 ($2) is in use: stop what listens there (another 'make cluster'?) or choose another port with $3=..."
  fi
}

# Wait (with a deadline) until 127.0.0.1:port accepts connections, or the process has died.
wait_port() { # pid port name log
  local pid=$1 port=$2 name=$3 log=$4 deadline=$((SECONDS + 30))
  until listening "$port"; do
    kill -0 "$pid" 2>/dev/null || die "$name exited: $(tail -n 3 "$log" 2>/dev/null) (see $log)"
    ((SECONDS < deadline)) || die "$name not listening on $port within 30 s"
    sleep 0.1
  done
}

# The pid in replica N's pid file, if that process is still replica N of this cluster (a pid
# file can outlive its process, and the pid be reused by another).
replica_pid() {
  local pid command
  pid=$(cat "$DIR/replica$1.pid" 2>/dev/null) || return 1
  command=$(tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline") || return 1
  [[ $command == *"--data-dir $DIR/replica$1 "* ]] && echo "$pid"
}

# Start replica N in the background, its output appended to its log, its pid in its pid file.
start_replica() {
  local n=$1 port
  port=$(replica_port "$n")
  "$SERVER" --address "127.0.0.1:$port" --data-dir "$DIR/replica$n" \
    --metrics-port "$(metrics_port "$n")" \
    --redis-url "$REDIS_URL" --shared-dir "$DIR/shared" --advertise-address "127.0.0.1:$port" \
    </dev/null >>"$DIR/logs/replica$n.log" 2>&1 &
  echo "$!" >"$DIR/replica$n.pid"
  wait_port "$!" "$port" "replica$n" "$DIR/logs/replica$n.log"
  echo "cluster: replica$n on 127.0.0.1:$port (metrics :$(metrics_port "$n"))"
}

if [ "${1:-}" = restart ]; then
  n=${2:-}
  [[ $n =~ ^[0-9]+$ ]] && ((n >= 1 && n <= REPLICAS)) \
    || die "restart: give the replica's number, 1 to $REPLICAS (make cluster-restart REPLICA=2)"
  [ -d "$DIR/logs" ] && listening "$REDIS_PORT" \
    || die "no cluster is running with its state in $DIR and Redis on port $REDIS_PORT: start one with 'make cluster' (or give its CLUSTER_DIR and ports)"
  if pid=$(replica_pid "$n"); then
    die "replica$n is running (pid $pid); to try a failover, kill it first: kill -9 $pid"
  fi
  require_free "$(replica_port "$n")" "replica$n" REPLICA_BASE_PORT
  start_replica "$n"
  echo "cluster: replica$n is back; the cluster's Ctrl-C stops it with the rest"
  exit 0
fi
[ $# = 0 ] || die "unknown arguments: $* (no arguments starts the cluster; 'restart N' a replica)"

require_free "$PORT" nginx PORT
require_free "$REDIS_PORT" redis-server REDIS_PORT
for ((n = 1; n <= REPLICAS; n++)); do
  require_free "$(replica_port "$n")" "replica$n" REPLICA_BASE_PORT
  require_free "$(metrics_port "$n")" "replica$n metrics" METRICS_BASE_PORT
done

mkdir -p "$DIR/redis" "$DIR/shared" "$DIR/nginx/tmp" "$DIR/logs"
rm -f "$DIR"/replica*.pid
REDIS_PID="" NGINX_PID=""

# SIGTERM a process and wait until it is gone (a replica drains first: up to its --grace).
stop_pid() {
  local pid=$1 deadline=$((SECONDS + 30))
  kill -TERM "$pid" 2>/dev/null || return 0
  wait "$pid" 2>/dev/null || true # reaps our own children; returns at once for others
  while kill -0 "$pid" 2>/dev/null; do
    ((SECONDS < deadline)) || { kill -KILL "$pid" 2>/dev/null; return 0; }
    sleep 0.1
  done
}

stop_all() {
  trap - INT TERM EXIT
  echo "cluster: stopping" >&2
  # nginx first (no new calls), then the replicas (they drain and release their leases through
  # Redis, so Redis must still be up; a restarted one is found by its pid file), Redis last.
  [ -z "$NGINX_PID" ] || stop_pid "$NGINX_PID"
  for ((n = REPLICAS; n >= 1; n--)); do
    if pid=$(replica_pid "$n"); then stop_pid "$pid"; fi
  done
  [ -z "$REDIS_PID" ] || stop_pid "$REDIS_PID"
}
trap stop_all EXIT
trap 'stop_all; exit 130' INT
trap 'stop_all; exit 143' TERM

"$REDIS_BIN" --port "$REDIS_PORT" --bind 127.0.0.1 --dir "$DIR/redis" --appendonly yes \
  --appendfsync everysec --save '' --daemonize no --logfile "$DIR/logs/redis.log" &
REDIS_PID=$!
wait_port "$REDIS_PID" "$REDIS_PORT" redis-server "$DIR/logs/redis.log"
echo "cluster: redis-server on 127.0.0.1:$REDIS_PORT (data in $DIR/redis)"

UPSTREAMS=""
for ((n = 1; n <= REPLICAS; n++)); do
  : >"$DIR/logs/replica$n.log"
  start_replica "$n"
  UPSTREAMS+="    server 127.0.0.1:$(replica_port "$n") max_fails=1 fail_timeout=5s;"$'\n'
done

USER_LINE=""
[ "$(id -u)" = 0 ] && USER_LINE="user root;" # workers would drop to nobody: no access to $DIR
cat >"$DIR/nginx/nginx.conf" <<EOF
# Written by scripts/cluster.sh; the container version is deploy/nginx.conf.
$USER_LINE
worker_processes 1;
pid $DIR/nginx/nginx.pid;
error_log $DIR/logs/nginx-error.log notice;
events { worker_connections 1024; }
http {
  log_format grpc '\$remote_addr "\$request" \$status grpc=\$sent_trailer_grpc_status '
                  'upstream=\$upstream_addr session=\$http_x_session_id time=\$request_time';
  access_log $DIR/logs/nginx-access.log grpc;
  client_body_temp_path $DIR/nginx/tmp/body;
  proxy_temp_path $DIR/nginx/tmp/proxy;
  fastcgi_temp_path $DIR/nginx/tmp/fastcgi;
  uwsgi_temp_path $DIR/nginx/tmp/uwsgi;
  scgi_temp_path $DIR/nginx/tmp/scgi;
  upstream rnnserve {
    hash \$http_x_session_id consistent;
$UPSTREAMS    keepalive 32;
  }
  server {
    listen 127.0.0.1:$PORT http2;
    client_max_body_size 64m;
    location / {
      grpc_pass grpc://rnnserve;
      grpc_read_timeout 1h;
      grpc_send_timeout 1h;
      grpc_next_upstream error timeout;
      grpc_next_upstream_tries 2;
    }
  }
}
EOF
"$NGINX_BIN" -p "$DIR/nginx" -c "$DIR/nginx/nginx.conf" -e "$DIR/logs/nginx-error.log" \
  -g 'daemon off;' &
NGINX_PID=$!
wait_port "$NGINX_PID" "$PORT" nginx "$DIR/logs/nginx-error.log"
echo "cluster: nginx on 127.0.0.1:$PORT -> ${REPLICAS} replicas; logs in $DIR/logs; Ctrl-C stops"
echo "cluster: lose a replica with kill -9 \"\$(cat $DIR/replica2.pid)\"; bring it back with" \
  "'make cluster-restart REPLICA=2' (CLUSTER_DIR=$DIR and the same ports)"

# Run until interrupted, or until Redis or nginx exits (a failure: say which and why). A
# replica may die (kill -9 to try failover): the others take over its sessions.
status=0
wait -n "$REDIS_PID" "$NGINX_PID" || status=$?
for name in redis nginx-error; do
  echo "--- $DIR/logs/$name.log (last lines) ---" >&2
  tail -n 5 "$DIR/logs/$name.log" >&2 || true
done
die "redis-server or nginx exited (status $status); the logs above say why"
