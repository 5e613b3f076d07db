# HaRP in one Twisted process. Configure with HP_* / NC_INSTANCE_URL environment
# variables; mount /certs (FRP PKI is generated there, cert.pem enables HTTPS).
#
# BASE: any image with Python 3.11+ and /bin/sh. The default is the public Python image;
# tools/build-image passes a Debian image it builds from packages (docs/operations.md).
# WHEELS: a folder of the build context holding harp's wheel, its dependencies' wheels and
# pip's own wheel (tools/build-image fills build/image/wheels). Set, the build installs only
# from it and needs no network; empty, pip installs the source tree from the package index.
# tools/build-image's wheel has the compiled per-request modules (harp/compiled.py); the
# source-tree path compiles them only where BASE has a C compiler and Python's headers
# (python:3.11-slim has not: HaRP then runs interpreted, `python -m harp check` says so).
ARG BASE=python:3.11-slim

FROM ${BASE} AS build
ARG WHEELS=
COPY . /src
# A venv without pip: the running image keeps no installer. pip runs from its own wheel
# (offline) or from the base image (online), and writes no cache.
RUN set -eu; \
    python3 -m venv --without-pip /opt/harp; \
    if [ -n "$WHEELS" ]; then \
        pip_whl=$(ls "/src/$WHEELS"/pip-*.whl); \
        /opt/harp/bin/python "$pip_whl/pip" install --no-cache-dir --no-index \
            --disable-pip-version-check --find-links "/src/$WHEELS" harp; \
    else \
        python3 -m pip --python /opt/harp/bin/python install --no-cache-dir \
            --disable-pip-version-check /src; \
    fi; \
    # Twisted ships its own test suites (a third of the venv); HaRP never imports them.
    find /opt/harp/lib -depth -type d -name test -path '*/site-packages/twisted/*' \
        -exec rm -rf {} +; \
    # twistd's plugin cache, written now: at run time site-packages may be read-only.
    /opt/harp/bin/python -c "from twisted.plugin import getPlugins, IPlugin; list(getPlugins(IPlugin))"

FROM ${BASE}
COPY --from=build /opt/harp /opt/harp
ENV PATH=/opt/harp/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
WORKDIR /srv/harp
VOLUME /certs

EXPOSE 8780 8781 8782
STOPSIGNAL SIGTERM
# /heartbeat needs the shared key; the check reads it from the same environment.
HEALTHCHECK --interval=10s --timeout=10s --retries=9 CMD ["python3", "-m", "harp", "healthcheck"]
# twistd is PID 1 and stops the reactor on SIGTERM (exit code 0).
# --pidfile= : a stale twistd.pid holding PID 1 would block a container restart.
ENTRYPOINT ["twistd", "-n", "--pidfile=", "harp"]
