# A Spine worker: `docker build -t spine-worker .` then run it with the settings as environment
# (TEMPORAL_ADDRESS / TEMPORAL_NAMESPACE / TEMPORAL_API_KEY or a mounted temporal.toml with
# TEMPORAL_PROFILE, VAULT_ADDR + VAULT_ROLE_ID + VAULT_SECRET_ID, SPINE_DATABASE_URL,
# SPINE_DEPLOYMENT_NAME + SPINE_BUILD_ID, SPINE_AGENTS, SPINE_POLICY, OTEL_EXPORTER_OTLP_ENDPOINT,
# SPINE_METRICS_ADDR). Scale replicas on the task queue's schedule-to-start latency.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    SPINE_STATE_DIR=/var/lib/spine

RUN useradd --system --create-home --home-dir /home/spine spine \
    && mkdir -p /var/lib/spine && chown spine /var/lib/spine

WORKDIR /app
COPY pyproject.toml README.md ./
COPY spine ./spine
COPY workflows ./workflows
COPY activities ./activities
COPY guardrails ./guardrails
COPY observability ./observability
COPY client ./client
COPY demo ./demo
# With bytecode compiled at build time: the workflow sandbox imports the workflow modules afresh
# for every run, and with PYTHONDONTWRITEBYTECODE nothing writes their bytecode later, so a
# worker without it compiles them from source for each run (~20 ms of CPU per run).
RUN pip install . \
    && rm -rf /root/.cache

# Your agents: install their package here (or COPY them and set SPINE_AGENTS), and your policy:
# COPY my_agents ./my_agents   (and RUN python -m compileall -q my_agents, as above)
# COPY policy.toml /etc/spine/policy.toml
# ENV SPINE_AGENTS=my_agents SPINE_POLICY=/etc/spine/policy.toml

USER spine
# The build id is what worker versioning pins runs to: pass the image tag at build time.
ARG SPINE_BUILD_ID=""
ENV SPINE_BUILD_ID=${SPINE_BUILD_ID}
EXPOSE 9464
ENTRYPOINT ["spine", "worker"]
