# wsgate in a container (README "Deployment: Docker"):
#   docker build -t wsgate .
#   docker run --rm -p 80:8080 -v "$PWD/wsgate.toml:/etc/wsgate/wsgate.toml:ro" wsgate
# Runs as uid 10001 on ports 8080 (and 8443 for TLS), with etc/wsgate-docker.toml as the default
# config.  The file system may be read-only (docker run --read-only): nothing is written.

# -- build: the wheel, with the frame engine's C accelerator (gcc is only in this stage) ----------
FROM python:3.11-slim-bookworm AS build
# Debian stable's current gcc; its security updates are the point of not pinning a version.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.cfg setup.py README.md LICENSE ./
COPY wsgate ./wsgate
COPY twisted ./twisted
# Then Twisted's plugin cache, made now: the image's site-packages are read-only for the gate.
RUN python -m venv /opt/wsgate \
    && /opt/wsgate/bin/pip install --no-cache-dir . \
    && /opt/wsgate/bin/python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))" \
    && /opt/wsgate/bin/wsgate version

# -- run -------------------------------------------------------------------------------------------
FROM python:3.11-slim-bookworm
ENV PATH=/opt/wsgate/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
RUN groupadd --system --gid 10001 wsgate \
    && useradd --system --uid 10001 --gid wsgate --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin wsgate
COPY --from=build /opt/wsgate /opt/wsgate
COPY etc/wsgate-docker.toml /etc/wsgate/wsgate.toml
USER 10001:10001
EXPOSE 8080 8443
# Alive: the admin listener of the example config answers (not /ready, which also says whether a
# backend is up: a backend outage must not get the gate restarted).
HEALTHCHECK --interval=15s --timeout=3s --start-period=5s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9020/status.json?limit=0&history=0', timeout=2)"]
# SIGTERM: every session gets Close 1001 within shutdown_grace, then the gate exits.
STOPSIGNAL SIGTERM
CMD ["wsgate", "run", "--config", "/etc/wsgate/wsgate.toml"]
