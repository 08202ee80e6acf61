# data_prep image (PyTorch side: SaT segmentation, SONAR encode/decode, text generation) for
# NVIDIA GPUs. No ENTRYPOINT: the command comes from the manifest, e.g.
#   python -m data_prep.embed --input='/data/raw/*.jsonl' --out=/data/wiki ...
#   docker build -f launch/docker/data-prep-gpu.Dockerfile -t REGISTRY/lcm-jax-data-prep:TAG .
# No model hub at run time (HF_HUB_OFFLINE=1): mount the Hugging Face cache at /cache/huggingface
# and the fairseq2 asset cards / checkpoints at /cache/fairseq2 (or pass file paths as flags).
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    HF_HOME=/cache/huggingface \
    FAIRSEQ2_CACHE_DIR=/cache/fairseq2/cache \
    FAIRSEQ2_USER_ASSET_DIR=/cache/fairseq2/assets

WORKDIR /app

# PyPI's torch 2.9.1 is the CUDA 12.8 build that fairseq2n 0.8.1 is linked against.
RUN pip install torch==2.9.1 torchaudio==2.9.1

COPY pyproject.toml README.md ./
COPY lcm_jax ./lcm_jax
COPY lcm_interop ./lcm_interop
COPY configs ./configs
COPY data_prep ./data_prep
COPY launch ./launch
RUN pip install ".[data]"

# fairseq2n needs libsndfile.so.1: use the copy bundled in the soundfile wheel (as scripts/setup.sh
# does for .venv/lib) instead of a system package.
RUN sndfile="$(python -c 'import glob, os, _soundfile_data as d; print(sorted(glob.glob(os.path.join(os.path.dirname(d.__file__), "libsndfile*.so")))[0])')" \
 && ln -sf "$sndfile" /usr/local/lib/libsndfile.so.1 \
 && ldconfig \
 && python -c "import fairseq2n, sonar, wtpsplit; print('data_prep image ok')"
