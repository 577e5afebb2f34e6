# The MLflow tracking server of the compose stack: MLflow with the PostgreSQL driver and boto3
# for artifacts on MinIO, run by an unprivileged user. Configured by environment variables only.
FROM python:3.11-slim

# A 3.x release, as pyproject's mlflow pin asks of the clients (tests/test_deploy.py checks).
ARG MLFLOW_VERSION=3.17.2
RUN pip install --no-cache-dir --disable-pip-version-check \
        "mlflow[auth]==${MLFLOW_VERSION}" "psycopg2-binary>=2.9" "boto3>=1.34" \
    && useradd --create-home --uid 1000 mlflow
USER mlflow
WORKDIR /home/mlflow
EXPOSE 5000
CMD ["mlflow", "server", "--host", "0.0.0.0", "--port", "5000"]
