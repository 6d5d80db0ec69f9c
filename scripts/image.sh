#!/usr/bin/env bash
# Build and test the rnnserve container image.
#
#   bash scripts/image.sh build   build $IMAGE: `docker build` when a Docker engine answers,
#                                 else buildah (with a local Debian base if none can be pulled)
#   bash scripts/image.sh test    build with buildah and prove the image end to end: run its own
#                                 entrypoint as its own user on a host data dir, health, create,
#                                 train, generate, metrics, SIGTERM -> exit 0, restart keeps the
#                                 session, the HEALTHCHECK command passes, size < SIZE_LIMIT_MB
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
    local missing=() tool
    for tool in buildah podman debootstrap; do
        command -v "$tool" > /dev/null || missing+=("$tool")
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
        local mirror rootfs
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

# The base for buildah: $BASE_IMAGE if set, else python:3.11-slim when it is here or can be
# pulled, else the local debootstrap base.
pick_base() {
    if [[ -n ${BASE_IMAGE:-} ]]; then
        echo "$BASE_IMAGE"
    elif "${PODMAN[@]}" image exists "$PULL_BASE" ||
        timeout 120 "${PODMAN[@]}" pull -q "$PULL_BASE" > /dev/null 2>&1; then
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
    local tag=$1 base tmp status=0
    ensure_tools
    base=$(pick_base)
    tmp=$(mktemp -d)
    write_pip_conf "$tmp/pip.conf"
    log "buildah build $tag (base $base)"
    # --format docker keeps HEALTHCHECK (the OCI image config has no field for it).
    "${BUILDAH[@]}" build --isolation chroot --format docker --pull-never \
        --build-arg "BASE_IMAGE=$base" \
        -v "$(host_ca_bundle):/etc/ssl/certs/ca-certificates.crt:ro" \
        -v "$tmp/pip.conf:/etc/pip.conf:ro" \
        -t "$tag" -f "$ROOT/Dockerfile" "$ROOT" || status=$?
    rm -rf "$tmp"
    ((status == 0)) || die "buildah build failed ($status)"
    # Intermediate (builder) images are not needed once the final image exists.
    "${BUILDAH[@]}" rmi --prune > /dev/null 2>&1 || true
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
