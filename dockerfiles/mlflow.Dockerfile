# syntax=docker/dockerfile:1.7
# MLflow tracking server of manifests/mlflow: Postgres backend (psycopg2), S3 artifacts (boto3).
#   docker build -f dockerfiles/mlflow.Dockerfile -t ghcr.io/retinaflow/mlflow-server:3.17.2 dockerfiles
FROM python:3.11.11-slim-bookworm

ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
RUN pip install --no-cache-dir mlflow==3.17.2 psycopg2-binary==2.9.10 boto3==1.43.11 \
    && useradd --uid 10001 --create-home --shell /usr/sbin/nologin mlflow
WORKDIR /home/mlflow
USER 10001
EXPOSE 5000
ENTRYPOINT ["mlflow"]
CMD ["server", "--host", "0.0.0.0", "--port", "5000"]
