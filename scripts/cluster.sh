#!/usr/bin/env bash
# `make cluster`: the topology of compose.cluster.yaml on this machine, without containers:
# redis-server + 3 rnnserve replicas on loopback ports + nginx in front (grpc_pass, hash on
# x-session-id). Runs in the foreground; Ctrl-C (or SIGTERM) stops everything it started.
#
#   rnnserve --address 127.0.0.1:$PORT health           # through nginx (default port 50051)
#   kill -9 "$(cat $DIR/replica2.pid)"                   # lose a replica
#
# Settings (environment): CLUSTER_DIR (state: redis data, shared checkpoints, logs; default
# ./cluster-data), PORT (nginx, 50051), REDIS_PORT (6390), REPLICA_BASE_PORT (50061: the
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

die() { echo "cluster: $*" >&2; exit 1; }

REDIS_BIN=$(command -v redis-server || true)
NGINX_BIN=$(command -v nginx || echo /usr/sbin/nginx)
[ -n "$REDIS_BIN" ] && [ -x "$NGINX_BIN" ] || die "redis-server and nginx are needed: run 'make deps'"
[ -x "$SERVER" ] || command -v "$SERVER" >/dev/null || die "$SERVER not found: run 'make install'"
"$SERVER" --help | grep -q -- '--redis-url' \
  || die "this rnnserve-server has no cluster flags (--redis-url, --shared-dir, --advertise-address) yet"

mkdir -p "$DIR/redis" "$DIR/shared" "$DIR/nginx/tmp" "$DIR/logs"
PIDS=()

stop_all() {
  trap - INT TERM EXIT
  echo "cluster: stopping" >&2
  # Reverse start order, one at a time: nginx (no new calls), the replicas (they drain and
  # release their leases through Redis, so Redis must still be up), Redis last.
  for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
    kill -TERM "${PIDS[$i]}" 2>/dev/null || true
    wait "${PIDS[$i]}" 2>/dev/null || true
  done
}
trap stop_all EXIT
trap 'stop_all; exit 130' INT
trap 'stop_all; exit 143' TERM

# Wait (with a deadline) until host:port accepts connections, or the process has died.
wait_port() {
  local pid=$1 port=$2 name=$3 deadline=$((SECONDS + 30))
  until (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; do
    kill -0 "$pid" 2>/dev/null || die "$name exited: see $DIR/logs/$name.log"
    ((SECONDS < deadline)) || die "$name not listening on $port within 30 s"
    sleep 0.1
  done
}

"$REDIS_BIN" --port "$REDIS_PORT" --bind 127.0.0.1 --dir "$DIR/redis" --appendonly yes \
  --appendfsync everysec --save '' --daemonize no --logfile "$DIR/logs/redis.log" &
PIDS+=($!)
wait_port "$!" "$REDIS_PORT" redis
REDIS_URL="redis://127.0.0.1:$REDIS_PORT/0"
echo "cluster: redis-server on 127.0.0.1:$REDIS_PORT (data in $DIR/redis)"

UPSTREAMS=""
for ((n = 1; n <= REPLICAS; n++)); do
  port=$((REPLICA_BASE_PORT + n - 1))
  "$SERVER" --address "127.0.0.1:$port" --data-dir "$DIR/replica$n" \
    --metrics-port $((METRICS_BASE_PORT + n - 1)) \
    --redis-url "$REDIS_URL" --shared-dir "$DIR/shared" --advertise-address "127.0.0.1:$port" \
    2>"$DIR/logs/replica$n.log" &
  PIDS+=($!)
  echo "$!" >"$DIR/replica$n.pid"
  wait_port "$!" "$port" "replica$n"
  UPSTREAMS+="    server 127.0.0.1:$port max_fails=1 fail_timeout=5s;"$'\n'
  echo "cluster: replica$n on 127.0.0.1:$port (metrics :$((METRICS_BASE_PORT + n - 1)))"
done

USER_LINE=""
[ "$(id -u)" = 0 ] && USER_LINE="user root;"  # workers would drop to nobody: no access to $DIR
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
PIDS+=($!)
wait_port "$!" "$PORT" nginx
echo "cluster: nginx on 127.0.0.1:$PORT -> ${REPLICAS} replicas; logs in $DIR/logs; Ctrl-C stops"

# Run until interrupted or until Redis or nginx exits; a replica may die (kill -9 to try
# failover) and the others take over its sessions.
wait -n "${PIDS[0]}" "${PIDS[-1]}" || true
echo "cluster: redis-server or nginx exited; see $DIR/logs" >&2
