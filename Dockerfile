# rnnserve server image.
#
#   docker build -t rnnserve .
#   docker run -p 50051:50051 -p 9090:9090 -v rnnserve-data:/data rnnserve
#
# Two stages: the builder turns client/ and server/ into wheels (plus the wheels of their
# dependencies) and installs exactly those into a virtualenv; the runtime stage copies that
# virtualenv onto a clean base, so no compiler, pip cache or source tree ships (the builder
# installs a C compiler for the server's engine kernel if its base has none).
# BASE_IMAGE may be any Debian-like image with python3 (3.11+) and the venv module; both stages
# use it so the virtualenv's interpreter path is the same in each.
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
WORKDIR /src
# pip compiles the server's engine kernel (C): a compiler and Python's headers where the base
# lacks them (python:3.11-slim has the headers, a plain Debian python3 has neither). Only this
# stage gets them; the runtime stage copies the built virtualenv.
RUN missing=""; \
    command -v cc > /dev/null || missing="gcc libc6-dev"; \
    python3 -c 'import os, sys, sysconfig; sys.exit(not os.path.isfile(os.path.join(sysconfig.get_path("include"), "Python.h")))' \
        || missing="$missing python3-dev"; \
    if [ -n "$missing" ]; then \
        apt-get update -q \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $missing \
        && rm -rf /var/lib/apt/lists/*; \
    fi
# client/LICENSE and server/LICENSE are links to this one.
COPY LICENSE LICENSE
COPY client/ client/
COPY server/ server/
# pip wheel resolves the server's "rnnserve>=0.1.0,<0.2" requirement to ./client from the same
# command.
RUN python3 -m venv /opt/build \
 && /opt/build/bin/pip wheel --wheel-dir /wheels ./client ./server
# --no-index: the runtime venv gets exactly the wheels built above, nothing fetched afterwards.
# pip and setuptools are not needed at run time; removing them saves ~15 MB. The --help calls
# fail the build if an entry point cannot start, the import if the engine's kernel was not built.
RUN python3 -m venv /opt/rnnserve \
 && /opt/rnnserve/bin/pip install --no-index --find-links /wheels rnnserve-server \
 && /opt/rnnserve/bin/pip uninstall -y pip setuptools \
 && /opt/rnnserve/bin/python -c 'import rnnserve_server.engine.cells._kernel' \
 && /opt/rnnserve/bin/rnnserve-server --help > /dev/null \
 && /opt/rnnserve/bin/rnnserve --help > /dev/null

FROM ${BASE_IMAGE}
# A fixed uid/gid so a host directory can be prepared for the volume: chown 10001:10001 DIR.
RUN groupadd --system --gid 10001 rnnserve \
 && useradd --uid 10001 --gid rnnserve --home-dir /data --no-create-home --no-log-init \
        --shell /usr/sbin/nologin rnnserve \
 && mkdir -p /data \
 && chown rnnserve:rnnserve /data
COPY --from=builder /opt/rnnserve /opt/rnnserve
ENV PATH=/opt/rnnserve/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    LANG=C.UTF-8 \
    PYTHONUNBUFFERED=1 \
    RNNSERVE_ADDRESS=0.0.0.0:50051 \
    RNNSERVE_DATA_DIR=/data \
    RNNSERVE_METRICS_PORT=9090
USER rnnserve
WORKDIR /data
VOLUME ["/data"]
# 50051: gRPC (rnnserve.v1.RnnService, grpc.health.v1, reflection); 9090: Prometheus /metrics.
EXPOSE 50051 9090
# The standard gRPC health service, queried with the client CLI that ships in the image.
HEALTHCHECK --interval=30s --timeout=10s --start-period=20s --retries=3 \
    CMD ["rnnserve", "health", "--address", "localhost:50051"]
# Exec form: rnnserve-server is PID 1 and receives SIGTERM itself (drains, checkpoints, exits 0).
ENTRYPOINT ["rnnserve-server"]
CMD []
