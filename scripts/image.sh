#!/usr/bin/env bash
# Build and test the rnnserve container image.
#
#   bash scripts/image.sh build   build $IMAGE: `docker build` when a Docker engine answers,
#                                 else buildah (with a local Debian base if none can be pulled)
#   bash scripts/image.sh test    build with buildah and prove the image end to end: run its own
#                                 entrypoint as its own user on a host data dir, health, create,
#                                 train, generate, metrics, SIGTERM -> exit 0, restart keeps the
#                                 session, the HEALTHCHECK command passes, the server as PID 1 of
#                                 its own PID namespace drains and checkpoints on SIGTERM, size <
#                                 SIZE_LIMIT_MB
#
# Every workaround for machines without a Docker engine or an image registry lives here, never in
# the Dockerfile: the base made with debootstrap from the Debian mirror apt is configured with
# (cached in $RNNSERVE_IMAGE_CACHE), and this machine's CA bundle and pip settings mounted into
# the build's RUN steps only (they are not part of the image).
#
# Environment: IMAGE (tag, default localhost/rnnserve:latest), BASE_IMAGE (skip base selection),
# RNNSERVE_IMAGE_CACHE (default /var/tmp/rnnserve-image-base), SIZE_LIMIT_MB (default 250).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
IMAGE=${IMAGE:-localhost/rnnserve:latest}
PULL_BASE=docker.io/library/python:3.11-slim
LOCAL_BASE=localhost/rnnserve-base:bookworm
CACHE_DIR=${RNNSERVE_IMAGE_CACHE:-/var/tmp/rnnserve-image-base}
SIZE_LIMIT_MB=${SIZE_LIMIT_MB:-250}
HOST_PY=${HOST_PY:-$ROOT/.venv/bin/python}
BUILDAH=(buildah --storage-driver vfs)
PODMAN=(podman --storage-driver vfs)

log() { printf '[image] %s\n' "$*" >&2; }
die() {
    printf '[image] FAIL: %s\n' "$*" >&2
    exit 1
}

# ---------------------------------------------------------------------------------------------
# Tools and base image

ensure_tools() {
    local missing=() tool_pkg
    # TOOL:PACKAGE; unshare and mountpoint (util-linux) run the server as PID 1 of a namespace.
    for tool_pkg in buildah:buildah podman:podman debootstrap:debootstrap unshare:util-linux \
        mountpoint:util-linux; do
        command -v "${tool_pkg%%:*}" > /dev/null ||
            [[ " ${missing[*]} " == *" ${tool_pkg#*:} "* ]] || missing+=("${tool_pkg#*:}")
    done
    ((${#missing[@]} == 0)) && return 0
    [[ $(id -u) == 0 ]] || die "missing ${missing[*]}: install them (apt-get install ${missing[*]})"
    log "installing ${missing[*]} with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q > /dev/null
    apt-get install -y -q "${missing[@]}" > /dev/null
}

docker_answers() {
    command -v docker > /dev/null && timeout 20 docker info > /dev/null 2>&1
}

# The Debian mirror this machine's apt uses (deb822 .sources first, then one-line lists), so the
# base is fetched from wherever apt is allowed to reach. RNNSERVE_DEBIAN_MIRROR overrides.
debian_mirror() {
    if [[ -n ${RNNSERVE_DEBIAN_MIRROR:-} ]]; then
        echo "$RNNSERVE_DEBIAN_MIRROR"
        return
    fi
    local uri="" f
    for f in /etc/apt/sources.list.d/*.sources; do
        [[ -f $f ]] || continue
        uri=$(awk 'BEGIN { RS = ""; FS = "\n" }
            {
                uri = ""; suite = 0; deb = 0; on = 1
                for (i = 1; i <= NF; i++) {
                    if ($i ~ /^URIs:/) { s = $i; sub(/^URIs:[ \t]*/, "", s); split(s, a, /[ \t]+/); uri = a[1] }
                    if ($i ~ /^Suites:/ && $i ~ /[ \t]bookworm([ \t]|$)/) suite = 1
                    if ($i ~ /^Types:/ && $i ~ /[ \t]deb([ \t]|$)/) deb = 1
                    if ($i ~ /^Enabled:[ \t]*[Nn]o/) on = 0
                }
                if (suite && deb && on && uri != "") { print uri; exit }
            }' "$f")
        [[ -n $uri ]] && break
    done
    if [[ -z $uri ]]; then
        uri=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2> /dev/null |
            awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i !~ /^\[/) { if ($(i + 1) == "bookworm") print $i; break } }' |
            head -n 1)
    fi
    [[ -n $uri ]] || die "no Debian bookworm mirror in /etc/apt/sources*: set RNNSERVE_DEBIAN_MIRROR"
    echo "$uri"
}

# Unmount anything a failed debootstrap left mounted under $1, then delete $1 without crossing
# into another file system (debootstrap may bind-mount the host's /dev in a container).
remove_rootfs() {
    local dir=$1 mnt
    [[ -d $dir ]] || return 0
    for mnt in $(awk -v d="$dir" 'index($2, d "/") == 1 { print $2 }' /proc/mounts | sort -r); do
        umount -l "$mnt" || true
    done
    if awk -v d="$dir" 'index($2, d "/") == 1 { found = 1 } END { exit !found }' /proc/mounts; then
        die "still mounted under $dir; not deleting it"
    fi
    rm -rf --one-file-system "$dir"
}

# A minimal Debian bookworm with python3 (3.11) and venv, as an image named $LOCAL_BASE. The
# root file system is cached as a tarball so later runs only import it (seconds, not minutes).
make_local_base() {
    if "${PODMAN[@]}" image exists "$LOCAL_BASE"; then
        return 0
    fi
    mkdir -p "$CACHE_DIR"
    local tarball=$CACHE_DIR/bookworm-minbase-python3.tar
    if [[ ! -s $tarball ]]; then
        local mirror rootfs t0=$SECONDS
        mirror=$(debian_mirror)
        rootfs=$(mktemp -d "$CACHE_DIR/rootfs.XXXXXX")
        log "debootstrap bookworm (minbase + python3) from apt's mirror into $rootfs"
        if ! debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
            bookworm "$rootfs" "$mirror" > "$CACHE_DIR/debootstrap.log" 2>&1; then
            tail -n 20 "$CACHE_DIR/debootstrap.log" >&2
            remove_rootfs "$rootfs"
            die "debootstrap failed (log: $CACHE_DIR/debootstrap.log)"
        fi
        remove_rootfs_mounts_check "$rootfs"
        # What an image needs no copy of: package caches and lists, docs, man pages, locales.
        rm -rf "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb \
            "$rootfs"/var/lib/apt/lists/* "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* \
            "$rootfs"/usr/share/info/* "$rootfs"/usr/share/locale/* "$rootfs"/var/log/*.log
        # mktemp made the directory 0700, and it becomes the image's "/": a non-root user
        # could not even resolve paths in it.
        chmod 0755 "$rootfs"
        tar --numeric-owner -C "$rootfs" -cf "$tarball.part" .
        mv "$tarball.part" "$tarball"
        remove_rootfs "$rootfs"
        log "base root file system made in $((SECONDS - t0)) s, cached in $tarball"
    fi
    log "importing $tarball as $LOCAL_BASE"
    "${PODMAN[@]}" import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' \
        --change 'CMD ["python3"]' \
        "$tarball" "$LOCAL_BASE" > /dev/null
}

# Fail rather than tar up a host file system that a debootstrap left bind-mounted.
remove_rootfs_mounts_check() {
    if awk -v d="$1" 'index($2, d "/") == 1 { found = 1 } END { exit !found }' /proc/mounts; then
        die "debootstrap left mounts under $1"
    fi
}

# The base for buildah: $BASE_IMAGE if set, else python:3.11-slim when it is here, else the local
# debootstrap base when an earlier run made it (a pull failed then), else python:3.11-slim if it
# can be pulled now, else a new local debootstrap base.
pick_base() {
    if [[ -n ${BASE_IMAGE:-} ]]; then
        echo "$BASE_IMAGE"
    elif "${PODMAN[@]}" image exists "$PULL_BASE"; then
        echo "$PULL_BASE"
    elif "${PODMAN[@]}" image exists "$LOCAL_BASE"; then
        log "using the local Debian base $LOCAL_BASE made by an earlier run"
        echo "$LOCAL_BASE"
    elif timeout 120 "${PODMAN[@]}" pull -q "$PULL_BASE" > /dev/null 2>&1; then
        echo "$PULL_BASE"
    else
        log "cannot pull $PULL_BASE: using a local Debian base"
        make_local_base
        echo "$LOCAL_BASE"
    fi
}

# ---------------------------------------------------------------------------------------------
# Build

# pip settings for the build's RUN steps: this machine's CA bundle (pip would otherwise trust only
# its own certifi copy) and any network index pip is configured with here. file:// indexes and
# find-links are this machine's disk and are not visible in the build, so they are left out.
write_pip_conf() {
    local out=$1 host_pip="" index extra
    [[ -x $ROOT/.venv/bin/pip ]] && host_pip=$ROOT/.venv/bin/pip
    index=${PIP_INDEX_URL:-}
    extra=${PIP_EXTRA_INDEX_URL:-}
    if [[ -n $host_pip ]]; then
        [[ -n $index ]] || index=$("$host_pip" config get global.index-url 2> /dev/null || true)
        [[ -n $extra ]] || extra=$("$host_pip" config get global.extra-index-url 2> /dev/null || true)
    fi
    index=$(printf '%s\n' $index | grep -E '^https?://' | head -n 1 || true)
    extra=$(printf '%s\n' $extra | grep -E '^https?://' | tr '\n' ' ' || true)
    {
        echo "[global]"
        echo "cert = /etc/ssl/certs/ca-certificates.crt"
        echo "timeout = ${PIP_DEFAULT_TIMEOUT:-120}"
        [[ -n $index ]] && echo "index-url = $index"
        [[ -n ${extra// /} ]] && echo "extra-index-url = $extra"
        [[ -n ${PIP_TRUSTED_HOST:-} ]] && echo "trusted-host = $PIP_TRUSTED_HOST"
        true
    } > "$out"
}

host_ca_bundle() {
    local f
    for f in "${PIP_CERT:-}" "${SSL_CERT_FILE:-}" /etc/ssl/certs/ca-certificates.crt; do
        [[ -n $f && -f $f ]] && {
            echo "$f"
            return
        }
    done
    die "no CA bundle found (set SSL_CERT_FILE)"
}

# buildah_build TAG: build the Dockerfile with buildah, the build's network settings mounted in.
buildah_build() {
    local tag=$1 base ca tmp old_id new_id status=0 t0=$SECONDS
    ensure_tools
    base=$(pick_base) || exit 1
    ca=$(host_ca_bundle) || exit 1
    log "tools and base ready in $((SECONDS - t0)) s"
    t0=$SECONDS
    old_id=$("${PODMAN[@]}" image inspect --format '{{.Id}}' "$tag" 2> /dev/null || true)
    tmp=$(mktemp -d)
    write_pip_conf "$tmp/pip.conf"
    log "buildah build $tag (base $base)"
    # --format docker keeps HEALTHCHECK (the OCI image config has no field for it).
    "${BUILDAH[@]}" build --isolation chroot --format docker --pull-never \
        --build-arg "BASE_IMAGE=$base" \
        -v "$ca:/etc/ssl/certs/ca-certificates.crt:ro" \
        -v "$tmp/pip.conf:/etc/pip.conf:ro" \
        -t "$tag" -f "$ROOT/Dockerfile" "$ROOT" || status=$?
    rm -rf "$tmp"
    ((status == 0)) || die "buildah build failed ($status)"
    # The image this tag named before is now untagged: don't let rebuilds pile up.
    new_id=$("${PODMAN[@]}" image inspect --format '{{.Id}}' "$tag")
    if [[ -n $old_id && $old_id != "$new_id" ]]; then
        "${BUILDAH[@]}" rmi "$old_id" > /dev/null 2>&1 || true
    fi
    BUILD_SECONDS=$((SECONDS - t0))
    log "buildah build took ${BUILD_SECONDS} s"
}

image_size_mb() {
    "${PODMAN[@]}" image inspect --format '{{.Size}}' "$1" | awk '{ printf "%.0f", $1 / 1000000 }'
}

cmd_build() {
    local t0=$SECONDS
    if docker_answers; then
        log "docker build -t $IMAGE"
        docker build -t "$IMAGE" "$ROOT"
    else
        log "no Docker engine answers: building with buildah"
        buildah_build "$IMAGE"
        log "built $IMAGE in $((SECONDS - t0)) s, $(image_size_mb "$IMAGE") MB"
    fi
}

# ---------------------------------------------------------------------------------------------
# Test: run the image as configured, on the host network (buildah run --isolation chroot; then
# unshare for PID 1 of a PID namespace, which chroot isolation does not give)

WORK=""
CONTAINERS=()
TEST_IMAGE=""
RUN_PID=""
BUILD_SECONDS=0
NS_PID=""      # the `unshare --pid --fork` of the PID 1 step; its one child is the server
TRAIN_PID=""   # the client Train stream running while that server gets SIGTERM
BIND_MOUNT=""  # the host data dir bind-mounted into a container's root file system

# Every process below $1 (children first-level first); only ever applied to processes we started.
descendants() {
    local child
    for child in $(pgrep -P "$1" || true); do
        echo "$child"
        descendants "$child"
    done
}

# The process a `buildah run` started from the image's command: the innermost one of the chain
# buildah run -> buildah-chroot-runtime -> buildah-chroot-exec -> command (buildah's helpers
# re-exec themselves, so their names are not reliable). Chroot isolation has no PID namespace:
# the command is an ordinary host process here, not PID 1 as under a container engine.
server_pid() {
    local pid=$RUN_PID child
    [[ -n $pid ]] || return 0
    while child=$(pgrep -P "$pid" | head -n 1) && [[ -n $child ]]; do pid=$child; done
    [[ $pid != "$RUN_PID" ]] && echo "$pid"
    return 0
}

alive() { [[ -n $1 ]] && kill -0 "$1" 2> /dev/null; }

# stop_run SIGNAL: signal the server, wait up to 30 s for `buildah run` to return, set RUN_RC.
stop_run() {
    local pid deadline=$((SECONDS + 30))
    pid=$(server_pid)
    [[ -n $pid ]] || die "no rnnserve-server process under buildah run $RUN_PID"
    kill "-$1" "$pid"
    while alive "$RUN_PID" && ((SECONDS < deadline)); do sleep 0.2; done
    alive "$RUN_PID" && die "the server did not exit within 30 s of SIG$1"
    RUN_RC=0
    wait "$RUN_PID" || RUN_RC=$?
    RUN_PID=""
}

cleanup() {
    local status=$? pid
    if alive "$RUN_PID"; then
        pid=$(server_pid)
        [[ -n $pid ]] && kill -TERM "$pid" 2> /dev/null
        sleep 2
        for pid in $(descendants "$RUN_PID") "$RUN_PID"; do kill -KILL "$pid" 2> /dev/null || true; done
        wait "$RUN_PID" 2> /dev/null || true
    fi
    if alive "$TRAIN_PID"; then
        kill -TERM "$TRAIN_PID" 2> /dev/null || true
        wait "$TRAIN_PID" 2> /dev/null || true
    fi
    if alive "$NS_PID"; then
        # unshare runs with --kill-child: SIGKILL to it takes the whole namespace down with it.
        pid=$(pgrep -P "$NS_PID" | head -n 1 || true)
        [[ -n $pid ]] && kill -TERM "$pid" 2> /dev/null
        sleep 2
        kill -KILL "$NS_PID" 2> /dev/null || true
        wait "$NS_PID" 2> /dev/null || true
    fi
    # Unmount the host data dir before `buildah rm` deletes the container's files; if it will not
    # go, keep every container rather than risk deleting through the mount.
    if [[ -n $BIND_MOUNT ]] && mountpoint -q "$BIND_MOUNT"; then
        umount "$BIND_MOUNT" 2> /dev/null || umount -l "$BIND_MOUNT" || {
            log "cannot unmount $BIND_MOUNT: leaving containers ${CONTAINERS[*]}"
            CONTAINERS=()
        }
    fi
    for ctr in "${CONTAINERS[@]}"; do "${BUILDAH[@]}" rm "$ctr" > /dev/null 2>&1 || true; done
    [[ -n $TEST_IMAGE ]] && "${BUILDAH[@]}" rmi -f "$TEST_IMAGE" > /dev/null 2>&1
    [[ -n $WORK ]] && rm -rf "$WORK"
    if ((status != 0)); then log "image-test FAILED"; fi
    exit "$status"
}

# Sets IMG_CMD, IMG_USER, IMG_VOLUME, IMG_HEALTH, IMG_ADDRESS, IMG_METRICS_PORT, IMG_ENV (every
# NAME=VALUE) and IMG_WORKDIR from the image.
read_image_config() {
    eval "$("${BUILDAH[@]}" inspect --type image "$1" | "$HOST_PY" -c '
import json, shlex, sys
d = json.load(sys.stdin)
c = (d.get("Docker") or {}).get("config") or d["OCIv1"]["config"]
def arr(name, xs):
    print(name + "=(" + " ".join(shlex.quote(x) for x in xs) + ")")
def val(name, x):
    print(name + "=" + shlex.quote(x))
arr("IMG_CMD", (c.get("Entrypoint") or []) + (c.get("Cmd") or []))
val("IMG_USER", c.get("User") or "")
val("IMG_VOLUME", next(iter(c.get("Volumes") or {}), ""))
test = (c.get("Healthcheck") or {}).get("Test") or []
if test[:1] == ["CMD-SHELL"]:
    test = ["/bin/sh", "-c"] + test[1:]
elif test[:1] == ["CMD"]:
    test = test[1:]
else:
    test = []
arr("IMG_HEALTH", test)
env = dict(e.split("=", 1) for e in c.get("Env") or [])
val("IMG_ADDRESS", env.get("RNNSERVE_ADDRESS", ""))
val("IMG_METRICS_PORT", env.get("RNNSERVE_METRICS_PORT", ""))
arr("IMG_ENV", c.get("Env") or [])
val("IMG_WORKDIR", c.get("WorkingDir") or "/")
')"
}

free_port() {
    "$HOST_PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# wait_serving PID LOG: wait until the test's port answers SERVING through the client library,
# failing as soon as PID (what started the server) exits.
wait_serving() {
    local deadline=$((SECONDS + 90))
    until "$HOST_PY" "$ROOT/scripts/image_check.py" wait "127.0.0.1:$PORT" --timeout 2 2> /dev/null; do
        if ! alive "$1"; then
            tail -n 30 "$2" >&2
            die "the server exited before it was SERVING (log above)"
        fi
        ((SECONDS < deadline)) || die "not SERVING within 90 s"
    done
}

# start_server CONTAINER LOG: the image's own entrypoint + cmd as its own user, the host data dir
# on its volume, only the ports changed through the environment.
start_server() {
    # buildah run would mount a fresh anonymous volume over our bind mount at the VOLUME path;
    # drop the declaration from this working container (not the image) so the host directory
    # takes its place, as with `docker run -v DIR:/data`.
    "${BUILDAH[@]}" config --volume "$IMG_VOLUME-" "$1"
    "${BUILDAH[@]}" run --isolation chroot --user "$IMG_USER" \
        --env "RNNSERVE_ADDRESS=$ADDRESS" --env "RNNSERVE_METRICS_PORT=$METRICS_PORT" \
        -v "$DATA:$IMG_VOLUME" \
        "$1" -- "${IMG_CMD[@]}" < /dev/null > "$2" 2>&1 &
    RUN_PID=$!
    wait_serving "$RUN_PID" "$2"
    local pid uid
    pid=$(server_pid)
    uid=$(awk '/^Uid:/ { print $2 }' "/proc/$pid/status")
    log "SERVING on 127.0.0.1:$PORT: pid $pid ($(cat "/proc/$pid/comm")), uid $uid," \
        "running the image's command: ${IMG_CMD[*]}"
    [[ $uid != 0 ]] || die "the server runs as root"
}

# pid1_step CONTAINER UID GID SESSION STEP: what `docker run` does and `buildah run --isolation
# chroot` cannot: the image's entrypoint + cmd as PID 1 of a new PID namespace (unshare --pid
# --fork --mount-proc), in the container's root file system with the image's working directory,
# user (uid/gid from its /etc/passwd, no supplementary groups) and environment (only the ports
# overridden), the host data dir bind-mounted on the VOLUME path. PID 1 gets no default signal
# actions, so SIGTERM from outside does anything only if the server handles it. A Train stream is
# running when SIGTERM arrives: the server must drain it, checkpoint, log "stopped" and exit 0.
pid1_step() {
    local ctr=$1 uid=$2 gid=$3 session=$4 step=$5 root env=() entry pid ns_pid status uid_now
    local log=$WORK/server-pid1.log train_out=$WORK/train-pid1.jsonl train_err=$WORK/train-pid1.err
    local deadline train_rc=0 reason final_step t0=$SECONDS
    root=$("${BUILDAH[@]}" mount "$ctr")
    mkdir -p "$root$IMG_VOLUME"
    BIND_MOUNT=$root$IMG_VOLUME
    mount --bind "$DATA" "$BIND_MOUNT"
    for entry in "${IMG_ENV[@]}"; do
        case ${entry%%=*} in
            RNNSERVE_ADDRESS | RNNSERVE_METRICS_PORT) ;;
            *) env+=("$entry") ;;
        esac
    done
    env+=("RNNSERVE_ADDRESS=$ADDRESS" "RNNSERVE_METRICS_PORT=$METRICS_PORT")
    # env -i: the server sees the image's environment only, not this script's. --mount-proc and
    # --wd apply inside --root; --kill-child takes the namespace down if unshare itself is killed.
    env -i "${env[@]}" "$(command -v unshare)" --pid --fork --kill-child --mount-proc=/proc \
        --root="$root" --wd="$IMG_WORKDIR" --setgid "$gid" --setuid "$uid" -- "${IMG_CMD[@]}" \
        < /dev/null > "$log" 2>&1 &
    NS_PID=$!
    wait_serving "$NS_PID" "$log"
    pid=$(pgrep -P "$NS_PID" | head -n 1 || true)
    [[ -n $pid ]] || die "no server process under unshare $NS_PID"
    ns_pid=$(awk '/^NSpid:/ { print $NF }' "/proc/$pid/status")
    uid_now=$(awk '/^Uid:/ { print $2 }' "/proc/$pid/status")
    grep '"serving"' "$log" | grep -Eq '"pid": ?1[,}]' || {
        tail -n 5 "$log" >&2
        die "the server's serving log line does not say pid 1"
    }
    ((ns_pid == 1)) || die "host pid $pid is pid $ns_pid in its namespace, not 1"
    ((uid_now == uid)) || die "the PID 1 server runs as uid $uid_now, not $uid"
    log "SERVING as PID 1 (host pid $pid, $(cat "/proc/$pid/comm"), uid $uid_now, cwd" \
        "$(readlink "/proc/$pid/cwd" | sed "s|^$root||")), its log says \"pid\": 1"
    "$HOST_PY" "$ROOT/scripts/image_check.py" verify "127.0.0.1:$PORT" "$session" "$step" ||
        die "the session is not there for the PID 1 server"

    # A Train stream that would run for minutes; SIGTERM lands once it has reported progress.
    "$HOST_PY" -m rnnserve --address "127.0.0.1:$PORT" --json train "$session" \
        --steps 1000000 --report-every 20 --max-seconds 60 > "$train_out" 2> "$train_err" &
    TRAIN_PID=$!
    deadline=$((SECONDS + 20))
    until [[ -s $train_out ]]; do
        alive "$TRAIN_PID" || die "the Train stream ended before reporting: $(cat "$train_err")"
        ((SECONDS < deadline)) || die "no Train progress within 20 s"
        sleep 0.1
    done
    touch "$WORK/before-sigterm"
    sleep 0.01
    # Only the process this step started: still the child of our unshare.
    [[ $(ps -o ppid= -p "$pid" | tr -d ' ') == "$NS_PID" ]] || die "pid $pid is not unshare's child"
    kill -TERM "$pid"
    deadline=$((SECONDS + 30))
    while alive "$NS_PID" && ((SECONDS < deadline)); do sleep 0.1; done
    alive "$NS_PID" && die "the PID 1 server did not exit within 30 s of SIGTERM"
    status=0
    wait "$NS_PID" || status=$?
    NS_PID=""
    deadline=$((SECONDS + 10))
    while alive "$TRAIN_PID" && ((SECONDS < deadline)); do sleep 0.1; done
    alive "$TRAIN_PID" && die "the Train stream did not end within 10 s of the server stopping"
    wait "$TRAIN_PID" || train_rc=$?
    TRAIN_PID=""
    ((status == 0)) || {
        tail -n 20 "$log" >&2
        die "the PID 1 server exited $status after SIGTERM"
    }
    grep '"shutting_down"' "$log" | grep -q '"SIGTERM"' ||
        die "no shutting_down on SIGTERM in the PID 1 log"
    grep -q '"stopped"' "$log" || die "no 'stopped' log line from the PID 1 server"
    [[ $DATA/sessions/$session.npz -nt $WORK/before-sigterm ]] ||
        die "$DATA/sessions/$session.npz was not checkpointed after SIGTERM"
    # The stream's last message is the server's final one: stopped for shutdown, at some step.
    read -r reason final_step < <(tail -n 1 "$train_out" | "$HOST_PY" -c '
import json, sys
d = json.load(sys.stdin)
print(d.get("stop_reason", "?"), d.get("step", "?"))' 2> /dev/null) || true
    [[ ${reason:-} == STOP_REASON_SHUTDOWN ]] || {
        tail -n 2 "$train_out" "$train_err" >&2
        die "the Train stream did not end with a shutdown message (client exit $train_rc)"
    }
    log "SIGTERM to PID 1 mid-Train: exit 0; the Train stream ended with $reason at step" \
        "$final_step (was $step); checkpoint rewritten; \"stopped\" logged ($((SECONDS - t0)) s)"
    umount "$BIND_MOUNT"
    BIND_MOUNT=""
    "${BUILDAH[@]}" umount "$ctr" > /dev/null
}

cmd_test() {
    local t0=$SECONDS build_s size_mb session=image-test step ctr1 ctr2 ctr3 uid gid rootfs
    trap cleanup EXIT
    [[ -x $HOST_PY ]] || die "$HOST_PY not found: run 'make install' first"
    ensure_tools
    WORK=$(mktemp -d /var/tmp/rnnserve-image-test.XXXXXX)
    TEST_IMAGE=localhost/rnnserve:image-test-$$

    log "1. build $TEST_IMAGE"
    buildah_build "$TEST_IMAGE"
    build_s=$BUILD_SECONDS

    read_image_config "$TEST_IMAGE"
    log "image config: entrypoint+cmd [${IMG_CMD[*]}], user $IMG_USER, volume $IMG_VOLUME," \
        "RNNSERVE_ADDRESS=$IMG_ADDRESS RNNSERVE_METRICS_PORT=$IMG_METRICS_PORT," \
        "HEALTHCHECK [${IMG_HEALTH[*]}]"
    ((${#IMG_CMD[@]} > 0)) || die "the image has no ENTRYPOINT/CMD"
    [[ -n $IMG_USER && $IMG_USER != root && $IMG_USER != 0 ]] || die "the image runs as root"
    [[ -n $IMG_VOLUME ]] || die "the image declares no VOLUME"
    ((${#IMG_HEALTH[@]} > 0)) || die "the image has no HEALTHCHECK"
    [[ -n $IMG_METRICS_PORT && $IMG_METRICS_PORT != 0 ]] || die "metrics are off in the image"

    ctr1=$("${BUILDAH[@]}" from --pull-never --name "rnnserve-image-test-1-$$" "$TEST_IMAGE")
    CONTAINERS+=("$ctr1")
    # The volume's host directory must be writable by the image's user: look its ids up in the
    # image's own /etc/passwd (the name may not exist on the host).
    rootfs=$("${BUILDAH[@]}" mount "$ctr1")
    read -r uid gid < <(awk -F: -v u="${IMG_USER%%:*}" '$1 == u || $3 == u { print $3, $4; exit }' \
        "$rootfs/etc/passwd") || true
    "${BUILDAH[@]}" umount "$ctr1" > /dev/null
    [[ -n $uid ]] || die "user $IMG_USER not in the image's /etc/passwd"
    DATA=$WORK/data
    mkdir -m 0700 "$DATA"
    chown "$uid:$gid" "$DATA"

    PORT=$(free_port)
    METRICS_PORT=$(free_port)
    ADDRESS="${IMG_ADDRESS%:*}:$PORT"
    log "2. run it: RNNSERVE_ADDRESS=$ADDRESS RNNSERVE_METRICS_PORT=$METRICS_PORT, $DATA on $IMG_VOLUME"
    start_server "$ctr1" "$WORK/server1.log"

    log "3. create a session, Train stream, Generate; scrape metrics"
    step=$("$HOST_PY" "$ROOT/scripts/image_check.py" exercise "127.0.0.1:$PORT" \
        "http://127.0.0.1:$METRICS_PORT/metrics" "$session") || die "client checks failed"

    log "4. SIGTERM, expect exit 0, then restart on the same data dir"
    stop_run TERM
    ((RUN_RC == 0)) || {
        tail -n 20 "$WORK/server1.log" >&2
        die "exit status $RUN_RC after SIGTERM"
    }
    grep -q '"stopped"' "$WORK/server1.log" || die "no 'stopped' log line after SIGTERM"
    [[ -f $DATA/sessions/$session.npz ]] || die "no checkpoint $DATA/sessions/$session.npz"
    log "exited 0 after SIGTERM; checkpoint $(stat -c %s "$DATA/sessions/$session.npz") bytes," \
        "owned by uid $(stat -c %u "$DATA/sessions/$session.npz")"
    ctr2=$("${BUILDAH[@]}" from --pull-never --name "rnnserve-image-test-2-$$" "$TEST_IMAGE")
    CONTAINERS+=("$ctr2")
    start_server "$ctr2" "$WORK/server2.log"
    "$HOST_PY" "$ROOT/scripts/image_check.py" verify "127.0.0.1:$PORT" "$session" "$step" ||
        die "the session did not survive the restart"

    log "5. the image's HEALTHCHECK command, in the container (its port swapped for the test's)"
    local health=() arg image_port=${IMG_ADDRESS##*:}
    for arg in "${IMG_HEALTH[@]}"; do health+=("${arg//:$image_port/:$PORT}"); done
    "${BUILDAH[@]}" run --isolation chroot --user "$IMG_USER" "$ctr2" -- "${health[@]}" ||
        die "HEALTHCHECK [${health[*]}] failed"
    log "HEALTHCHECK [${health[*]}] passed"
    stop_run TERM
    ((RUN_RC == 0)) || die "exit status $RUN_RC after SIGTERM (second container)"
    if "${BUILDAH[@]}" run --isolation chroot --user "$IMG_USER" "$ctr2" -- "${health[@]}" \
        > /dev/null 2>&1; then
        die "HEALTHCHECK passed with no server running"
    fi
    log "HEALTHCHECK fails once the server is gone, as it should"

    log "6. the image's command as PID 1 of its own PID namespace: SIGTERM mid-Train"
    ctr3=$("${BUILDAH[@]}" from --pull-never --name "rnnserve-image-test-3-$$" "$TEST_IMAGE")
    CONTAINERS+=("$ctr3")
    pid1_step "$ctr3" "$uid" "$gid" "$session" "$step"

    log "7. image size"
    size_mb=$(image_size_mb "$TEST_IMAGE")
    log "image size ${size_mb} MB (limit ${SIZE_LIMIT_MB} MB); buildah build ${build_s} s;" \
        "whole test $((SECONDS - t0)) s"
    ((size_mb <= SIZE_LIMIT_MB)) || die "image is ${size_mb} MB, over ${SIZE_LIMIT_MB} MB"
    log "image-test passed"
}

main() {
    case ${1:-} in
        build) cmd_build ;;
        test) cmd_test ;;
        *)
            echo "usage: $0 build|test" >&2
            exit 2
            ;;
    esac
}

main "$@"
