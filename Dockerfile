# syntax=docker/dockerfile:1.7
#
# The worker image for `kiln prepare` on Dataflow (and on Spark/Flink with environment_type DOCKER):
# Beam's Python SDK harness + kiln + CUDA torch + the model weights, baked in at build time so no
# worker ever downloads a model (HF_HUB_OFFLINE=1 at run time).
#
#   docker build -t us-docker.pkg.dev/your-project/kiln/worker:latest \
#     --build-arg MODELS=laion400m-defaults .
#   docker push us-docker.pkg.dev/your-project/kiln/worker:latest
#
# then run with beam_options/dataflow.yaml, whose kiln: section says `models: /models`: every model
# flag left at its default (or naming a registry model) is taken from the folder `kiln models fetch`
# wrote, and /models/models.json's sha256 of every file lands in stats.json and the card.

# Base: Beam's own SDK image for the same Beam and Python versions as the submitting machine (the
# harness's boot binary, /opt/apache/beam/boot, is its ENTRYPOINT, which Dataflow requires). PyPI's
# torch wheels for Linux x86_64 are CUDA builds that carry the CUDA runtime as nvidia-* wheels; the
# GPU driver comes from the host (Dataflow: `install-nvidia-driver` in the accelerator hint), so no
# CUDA base image is needed. The other documented pattern also works: FROM a CUDA/PyTorch image,
# install Python 3.11 + apache-beam==2.77.0 + kiln, and
#   COPY --from=apache/beam_python3.11_sdk:2.77.0 /opt/apache/beam /opt/apache/beam
#   ENTRYPOINT ["/opt/apache/beam/boot"]
#
# Not built in kiln's CI: the development machines have no Docker engine. Build it where one is.

ARG BEAM_VERSION=2.77.0
FROM apache/beam_python3.11_sdk:${BEAM_VERSION}

ARG BEAM_VERSION
# The same pins as the Makefile (README "Install notes"): torch/torchvision in one command with
# everything else, sentencepiece 0.2.2 (0.2.3 needs protobuf 7, which apache-beam caps below 7).
ARG TORCH_VERSION=2.13.0
ARG TORCHVISION_VERSION=0.28.0

# Models, baked in at build time with `kiln models fetch` (pipeline/models: the registry as data,
# pinned revisions / sha256 where a public source states them, every other file hashed on first
# fetch into /models/models.json; pickles that carry code are refused; LAION's autokeras NSFW zips
# are converted to safetensors by filters.nsfw_keras). `kiln models list` shows what MODELS can name:
# a set (laion400m-defaults: Detoxify original, OpenAI ViT-B/32, LAION's B/32 NSFW head, T5 v1.1
# XXL) or model names, space-separated. MODELS_MIRROR replaces the host of release-file URLs.
# T5 v1.1 XXL is its full fp32 checkpoint (~44 GB: pytorch_model.bin); the image is large.
ARG MODELS=laion400m-defaults
ARG MODELS_MIRROR=

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    NO_ALBUMENTATIONS_UPDATE=1 \
    WANDB_MODE=disabled

WORKDIR /opt/kiln
COPY pyproject.toml README.md ./
COPY pipeline ./pipeline
COPY filters ./filters
COPY embed ./embed
COPY train ./train

# One pip command with the pins (an unpinned torch, or a later install without them, swaps the
# torch build); apache-beam pinned to the base image's so the harness and the SDK stay in step.
RUN pip install "apache-beam[gcp]==${BEAM_VERSION}" "torch==${TORCH_VERSION}" \
        "torchvision==${TORCHVISION_VERSION}" "sentencepiece==0.2.2" . \
    && pip check \
    && python -c "import torch, apache_beam, pipeline; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'beam', apache_beam.__version__)"

# Download the models (the only step with network access to model hosts), verify every file, and
# keep no cache beside them. `kiln models verify /models` re-checks the folder at any time.
RUN kiln models fetch ${MODELS} --to /models ${MODELS_MIRROR:+--mirror "$MODELS_MIRROR"} \
    && kiln models verify /models \
    && rm -rf /root/.cache/huggingface /root/.cache/torch

# Run time: nothing reaches a model hub; transformers/open_clip read only /models.
ENV HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HF_HOME=/models/hf-home

# The Beam SDK image's ENTRYPOINT (/opt/apache/beam/boot) is kept: it starts the SDK harness.
