# One image for every process of the cluster: the functions (Knative Services), the pull
# worker, the node agent, the JetStream -> Broker bridge, the provision Job and the web UI.
# The process is chosen by the command (ENTRYPOINT ollama-autoscaler):
#   serve                      functions-framework server for $FUNCTION_TARGET on $PORT (default)
#   worker | agent | bridge    long-running, with --health-port for /healthz and /readyz
#   provision | tick | ui      see `ollama-autoscaler --help`
# Build:  docker build -t ghcr.io/ollama-autoscaler/ollama-autoscaler:0.1.0 .
# tests/test_dockerfile.py performs this file's install steps and starts each entry point.

ARG PYTHON_IMAGE=python:3.12.12-slim-bookworm

# -- build: a virtual environment from the locked requirements (wheels only: no compiler) -------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_ONLY_BINARY=:all:
ARG VENV=/opt/venv
WORKDIR /src
COPY requirements.lock pyproject.toml README.md ./
COPY events events
COPY domain domain
COPY stores stores
COPY runtimes runtimes
COPY functions functions
COPY agent agent
COPY stack stack
COPY autoscaler autoscaler
COPY ui ui
COPY gateway gateway
COPY bench bench
RUN python -m venv "${VENV}" \
 && "${VENV}/bin/pip" install --quiet -r requirements.lock \
 && "${VENV}/bin/pip" install --quiet --no-deps . \
 && "${VENV}/bin/python" -m compileall -q "${VENV}/lib" \
 && "${VENV}/bin/ollama-autoscaler" --help > /dev/null

# -- runtime: the environment and nothing else; no compilers, no package manager use ------------
FROM ${PYTHON_IMAGE} AS runtime
ARG VENV=/opt/venv
RUN useradd --uid 10001 --user-group --create-home --home-dir /home/app --shell /usr/sbin/nologin app
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/app \
    PORT=8080 \
    BOKEH_RESOURCES=server
USER 10001:10001
WORKDIR /home/app
EXPOSE 8080
# /healthz of the function server ($PORT) or of a daemon's --health-port ($OA_HEALTH_PORT).
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('OA_HEALTH_PORT', os.environ.get('PORT', '8080')), timeout=4)"]
ENTRYPOINT ["ollama-autoscaler"]
CMD ["serve"]
