# syntax=docker/dockerfile:1
# MLflow tracking server image: MLflow with the basic-auth app, the PostgreSQL driver and the GCS
# client, run as an unprivileged user. Used by infra/k8s/mlflow/deployment.yaml.
#
#   docker build -f infra/docker/mlflow.Dockerfile -t "$REGISTRY/mlflow-server:3.17.2" infra/docker
#   docker push "$REGISTRY/mlflow-server:3.17.2"
#
# The MLflow version is the 3.x release the project's clients resolve to (pyproject.toml allows
# >=3.0,<4); server and clients on the same version avoid schema surprises.
FROM python:3.11.14-slim-bookworm

RUN groupadd --gid 10001 mlflow \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin mlflow

RUN python -m pip install --no-cache-dir --disable-pip-version-check \
        "mlflow[auth]==3.17.2" \
        "psycopg2-binary==2.9.13" \
        "google-cloud-storage>=2.18,<4"

ENV HOME=/tmp \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    MLFLOW_ENABLE_TELEMETRY=false

USER 10001:10001
EXPOSE 5000

HEALTHCHECK --interval=30s --timeout=5s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:5000/health', timeout=4)"]

CMD ["mlflow", "server", "--host", "0.0.0.0", "--port", "5000"]
