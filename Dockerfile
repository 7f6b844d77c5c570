# refold worker / bootstrap image.
FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 OPENBLAS_NUM_THREADS=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY worker ./worker
COPY schemas ./schemas
RUN pip install . && useradd --create-home refold
USER refold
ENTRYPOINT ["refold"]
CMD ["worker"]
