# HaRP in one Twisted process. Configure with HP_* / NC_INSTANCE_URL environment
# variables; mount /certs (FRP PKI is generated there, cert.pem enables HTTPS).
FROM python:3.11-slim

WORKDIR /srv/harp
COPY pyproject.toml README.md ./
COPY harp ./harp
COPY twisted ./twisted
RUN pip install --no-cache-dir . && rm -rf /srv/harp/harp /srv/harp/twisted \
    && python -c "from twisted.plugin import getPlugins, IPlugin; list(getPlugins(IPlugin))"

EXPOSE 8780 8781 8782
STOPSIGNAL SIGTERM
# /heartbeat needs the shared key; the check reads it from the same environment.
HEALTHCHECK --interval=10s --timeout=10s --retries=9 CMD ["python", "-m", "harp", "healthcheck"]
# --pidfile= : a stale twistd.pid holding PID 1 would block a container restart.
ENTRYPOINT ["twistd", "-n", "--pidfile=", "harp"]
