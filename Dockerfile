# syntax=docker/dockerfile:1
#
# dptr's two images, one target each; they share the build and runtime stages:
#
#   operator  polls AWS Data Pipeline and turns every task into a Job. Core
#             dependencies plus the `operator` extra (kopf, prometheus-client;
#             no Kubernetes client: kopf logs in with dptr's own client config).
#   sidecar   runs beside every task container, heartbeats the task at AWS Data
#             Pipeline and reports how it ended. Core dependencies only
#             (boto3, pydantic): no kopf, no Kubernetes client.
#   activity  the task container of SqlActivity attempts (dptr-activity): the
#             sidecar's packages, dptr_activities and the `activities` extra
#             (psycopg with its bundled libpq, PyMySQL).
#
# Build from the repository root:
#   docker build --target operator -t dptr-operator .
#   docker build --target sidecar -t dptr-sidecar .
#   docker build --target activity -t dptr-activity .
#
# BASE_IMAGE is Debian bookworm, whose python3 is the project's Python 3.11.
# The test bed swaps it for a base assembled locally from Debian packages
# (localhost/debian-base:bookworm); see docs/real-node.md.
#
# Every image carries the OCI labels org.opencontainers.image.{title,description,
# source,version,revision,licenses}, set by the last step of each target from the build
# args VERSION (pyproject.toml's), REVISION (the commit) and SOURCE (the repository):
#   docker build --target operator --build-arg VERSION=0.1.0 \
#     --build-arg REVISION="$(git rev-parse HEAD)" -t dptr-operator .
# `make images` (dptr-testbed images --release) passes them, and the same keys as
# manifest annotations; release.yml sets the same labels with build-push-action.
ARG BASE_IMAGE=docker.io/library/debian:bookworm-slim@sha256:56ff6d36d4eb3db13a741b342ec466f121480b5edded42e4b7ee850ce7a418ee

# ---- build: an empty virtualenv, the toolchain both images build with ------
FROM ${BASE_IMAGE} AS build
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/dptr

# ---- build-sidecar: the venv with dptr and its core dependencies -----------
FROM build AS build-sidecar
# Only for builds behind a TLS-intercepting proxy: a CA bundle path that pip
# should trust (the file is mounted into the build, never copied into a layer).
ARG PIP_CERT=
# Dependencies first, read from pyproject.toml, so that a code change does not
# download them again: the core dependencies only (no extras: no kopf).
COPY pyproject.toml /src/pyproject.toml
RUN python3 -c "import sys, tomllib; d = tomllib.load(open('/src/pyproject.toml', 'rb'))['project']; print('\n'.join(d['dependencies'] + [r for e in sys.argv[1:] for r in d['optional-dependencies'][e]]))" > /tmp/requirements.txt \
 && /opt/dptr/bin/pip install --no-cache-dir --disable-pip-version-check ${PIP_CERT:+--cert "$PIP_CERT"} \
      -r /tmp/requirements.txt 'setuptools>=69' wheel
COPY README.md /src/
# Only the packages this image runs: the other component directories are
# absent from /src, so setuptools finds no package there.
COPY common /src/common
COPY sidecar /src/sidecar
# Then dptr itself.
RUN /opt/dptr/bin/pip install --no-cache-dir --disable-pip-version-check --no-deps --no-build-isolation /src \
 && /opt/dptr/bin/pip uninstall -y --disable-pip-version-check pip setuptools wheel \
 && /opt/dptr/bin/python -c 'import dptr_sidecar, dptr_common' \
 && ! /opt/dptr/bin/python -c 'import kopf' 2>/dev/null \
 && ! /opt/dptr/bin/python -c 'import kubernetes' 2>/dev/null

# ---- build-activity: the venv with dptr and the activities extra -----------
FROM build AS build-activity
ARG PIP_CERT=
COPY pyproject.toml /src/pyproject.toml
RUN python3 -c "import sys, tomllib; d = tomllib.load(open('/src/pyproject.toml', 'rb'))['project']; print('\n'.join(d['dependencies'] + [r for e in sys.argv[1:] for r in d['optional-dependencies'][e]]))" activities > /tmp/requirements.txt \
 && /opt/dptr/bin/pip install --no-cache-dir --disable-pip-version-check ${PIP_CERT:+--cert "$PIP_CERT"} \
      -r /tmp/requirements.txt 'setuptools>=69' wheel
COPY README.md /src/
COPY common /src/common
COPY sidecar /src/sidecar
COPY activities /src/activities
RUN /opt/dptr/bin/pip install --no-cache-dir --disable-pip-version-check --no-deps --no-build-isolation /src \
 && /opt/dptr/bin/pip uninstall -y --disable-pip-version-check pip setuptools wheel \
 && /opt/dptr/bin/python -c 'import dptr_activities.connect, psycopg, pymysql' \
 && ! /opt/dptr/bin/python -c 'import kopf' 2>/dev/null

# ---- build-operator: the venv with dptr and the operator extra -------------
FROM build AS build-operator
ARG PIP_CERT=
# The core dependencies and the `operator` extra, as above.
COPY pyproject.toml /src/pyproject.toml
RUN python3 -c "import sys, tomllib; d = tomllib.load(open('/src/pyproject.toml', 'rb'))['project']; print('\n'.join(d['dependencies'] + [r for e in sys.argv[1:] for r in d['optional-dependencies'][e]]))" operator > /tmp/requirements.txt \
 && /opt/dptr/bin/pip install --no-cache-dir --disable-pip-version-check ${PIP_CERT:+--cert "$PIP_CERT"} \
      -r /tmp/requirements.txt 'setuptools>=69' wheel
COPY README.md /src/
COPY common /src/common
COPY operator /src/operator
RUN /opt/dptr/bin/pip install --no-cache-dir --disable-pip-version-check --no-deps --no-build-isolation /src \
 && /opt/dptr/bin/pip uninstall -y --disable-pip-version-check pip setuptools wheel \
 && /opt/dptr/bin/python -c 'import dptr_operator, dptr_common, kopf, prometheus_client' \
 && ! /opt/dptr/bin/python -c 'import kubernetes' 2>/dev/null

# ---- runtime: python3 and the non-root user, nothing of dptr's yet ---------
FROM ${BASE_IMAGE} AS runtime
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/* /var/log/apt /var/log/dpkg.log \
 && groupadd --gid 65532 nonroot \
 && useradd --uid 65532 --gid 65532 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin nonroot

# ---- the images ------------------------------------------------------------
# Bytecode is compiled at build time and nothing is written at run time, so
# both run with readOnlyRootFilesystem: true. The two targets differ only in
# the venv they copy, their entry point and their title. (Without --target, a
# build makes the last one: the operator.)
FROM runtime AS sidecar
COPY --from=build-sidecar /opt/dptr /opt/dptr
ENV PATH=/opt/dptr/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 65532:65532
ENTRYPOINT ["dptr-sidecar"]
# Last, so that a new revision only re-does this step.
ARG VERSION=unknown
ARG REVISION=unknown
ARG SOURCE=https://github.com/dptr-dev/dptr
LABEL org.opencontainers.image.title="dptr-sidecar" \
      org.opencontainers.image.description="dptr sidecar: a Kubernetes-native task runner for AWS Data Pipeline" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0"

FROM runtime AS activity
COPY --from=build-activity /opt/dptr /opt/dptr
ENV PATH=/opt/dptr/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 65532:65532
ENTRYPOINT ["dptr-activity"]
# Last, so that a new revision only re-does this step.
ARG VERSION=unknown
ARG REVISION=unknown
ARG SOURCE=https://github.com/dptr-dev/dptr
LABEL org.opencontainers.image.title="dptr-activity" \
      org.opencontainers.image.description="dptr activity: a Kubernetes-native task runner for AWS Data Pipeline" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0"

FROM runtime AS operator
COPY --from=build-operator /opt/dptr /opt/dptr
ENV PATH=/opt/dptr/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 65532:65532
ENTRYPOINT ["dptr-operator"]
# Last, so that a new revision only re-does this step.
ARG VERSION=unknown
ARG REVISION=unknown
ARG SOURCE=https://github.com/dptr-dev/dptr
LABEL org.opencontainers.image.title="dptr-operator" \
      org.opencontainers.image.description="dptr operator: a Kubernetes-native task runner for AWS Data Pipeline" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0"
