# mmpo-megatron on an NGC PyTorch image (CUDA torch, Transformer Engine, NCCL, Apex already inside).
#   docker build -t mmpo-megatron --build-arg NGC_TAG=25.10-py3 .
#   docker run --gpus all --ipc=host --ulimit memlock=-1 --ulimit stack=67108864 \
#     -v /data:/workspace/data -v /checkpoints:/workspace/checkpoints mmpo-megatron \
#     examples/train_mmpo.py --config-name smollm2_135m_mmpo data.tokenizer=/workspace/data/SmolLM2-135M-Instruct
ARG NGC_TAG=25.10-py3
FROM nvcr.io/nvidia/pytorch:${NGC_TAG}

# The image pins its torch / TE / NCCL builds through pip's constraint file (PIP_CONSTRAINT);
# everything below installs *within* those pins, so the image's CUDA torch and TE are never replaced.
ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/workspace/.cache/huggingface \
    CUDA_DEVICE_MAX_CONNECTIONS=1

WORKDIR /opt/mmpo-megatron
# Dependencies first (a layer that survives code edits), then the code. They are read from
# pyproject.toml (one list to keep) less torch, which stays the image's CUDA build.
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; from packaging.requirements import Requirement; \
deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; \
print('\n'.join(d for d in deps if Requirement(d).name != 'torch'))" > /tmp/requirements.txt \
    && python -m pip install --requirement /tmp/requirements.txt \
    && rm /tmp/requirements.txt
COPY mmpo_megatron ./mmpo_megatron
COPY configs ./configs
COPY examples ./examples
COPY tools ./tools
# --no-deps: the dependencies are in the layer above, and torch / TE stay the image's.
RUN python -m pip install --no-deps -e . \
    && python -c "import mmpo_megatron, megatron.core, transformer_engine; print('mmpo-megatron ready')"

# Run as an unprivileged user; data, checkpoints and caches live on mounted /workspace.
# Ubuntu 24.04 based images already have uid 1000 (user "ubuntu"): reuse it rather than fail.
RUN (id -u 1000 >/dev/null 2>&1 || useradd --create-home --uid 1000 --user-group mmpo) \
    && mkdir -p /workspace/data /workspace/checkpoints /workspace/.cache \
    && chown -R 1000:1000 /workspace /opt/mmpo-megatron
# Numeric, so Kubernetes' runAsNonRoot can verify it.
USER 1000:1000
WORKDIR /opt/mmpo-megatron

# One process per visible GPU on this node; arguments name the script and its Hydra overrides.
ENTRYPOINT ["torchrun", "--nproc-per-node", "gpu"]
CMD ["examples/train_mmpo.py", "--config-name", "smollm2_135m_mmpo"]
