# lcm_jax training image for NVIDIA GPUs (no ENTRYPOINT: the command comes from the manifest or
# from XManager, e.g. python -m lcm_jax.main --config=configs/mse_1b6.py --workdir=gs://...).
#   docker build -f launch/docker/train-gpu.Dockerfile -t REGISTRY/lcm-jax-train-gpu:TAG .
# CUDA 12, cuDNN and NCCL come as pip wheels with jax[cuda12]; the host needs only the NVIDIA
# driver (GKE GPU nodes mount it into the container).
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

RUN pip install "jax[cuda12]==0.10.2"

COPY pyproject.toml README.md ./
COPY lcm_jax ./lcm_jax
COPY lcm_interop ./lcm_interop
COPY configs ./configs
COPY data_prep ./data_prep
COPY launch ./launch
RUN pip install .
