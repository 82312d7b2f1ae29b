# Bearpaw gateway and worker image (CPU: the GPU lives in the vLLM service).
FROM python:3.11-slim
WORKDIR /app
# torch first, CPU build: otherwise sentence-transformers pulls a multi-GB CUDA build.
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
COPY pyproject.toml README.md ./
COPY gateway gateway
COPY backends backends
COPY cache cache
COPY workers workers
RUN pip install --no-cache-dir .
ENV BEARPAW_HOST=0.0.0.0 BEARPAW_PORT=8080 BEARPAW_DATA_DIR=/data HF_HUB_OFFLINE=1 \
    BEARPAW_ONNX_CACHE=/opt/bearpaw/onnx
# Export the embedder to ONNX at build time, so containers start without it.
RUN python -c "from cache.embedder import Embedder; assert Embedder().runtime == 'onnx'"
EXPOSE 8080
CMD ["bearpaw", "serve", "--no-worker"]
