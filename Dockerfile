# syntax=docker/dockerfile:1.7
#
# The worker image for `kiln prepare` on Dataflow (and on Spark/Flink with environment_type DOCKER):
# Beam's Python SDK harness + kiln + CUDA torch + the model weights, baked in at build time so no
# worker ever downloads a model (HF_HUB_OFFLINE=1 at run time).
#
#   docker build -t us-docker.pkg.dev/your-project/kiln/worker:latest \
#     --build-arg T5_MODEL=google/t5-v1_1-xxl .
#   docker push us-docker.pkg.dev/your-project/kiln/worker:latest
#
# then run with beam_options/dataflow.yaml, whose kiln: section names these in-image model paths:
#   --toxicity-model local:/models/toxicity --clip-model local-dir:/models/clip
#   --t5-model local:/models/t5 --nsfw off  (or --nsfw-head /models/nsfw/head.safetensors | head.pth
#   for an image built with NSFW_HEAD_URL)
# /models/MODELS.json records every file's sha256; kiln records the same hashes in stats.json.
#
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

# Models, baked in at build time. Each has a pinned revision or an expected sha256: a changed
# upstream file fails the build instead of silently changing what the job filters with.
#   CLIP_MODEL      a Hugging Face repo in open_clip's layout (open_clip_config.json +
#                   open_clip_model.safetensors); the default is OpenAI's ViT-B/32, LAION-400M's
#                   own filter model. kiln: --clip-model local-dir:/models/clip
#   T5_MODEL        Imagen's frozen text encoder; only the encoder is kept, saved as safetensors in
#                   bfloat16 (~9.5 GB for XXL instead of ~44 GB for the full fp32 checkpoint; the
#                   conversion needs ~50 GB of RAM on the build machine).
#                   kiln: --t5-model local:/models/t5
#   TOXICITY_MODEL  a Detoxify model name; its checkpoint comes from Detoxify's release URL
#                   (checked against the hash prefix in its file name, and TOXICITY_SHA256 if set),
#                   its config and tokenizer from the hub. kiln: --toxicity-model local:/models/toxicity
#   NSFW_HEAD_URL   LAION's CLIP-embedding NSFW head in kiln's layout (filters/nsfw.py); empty =
#                   none (run with --nsfw off). LAION's published torch head, h14_nsfw.pth, is for
#                   ViT-H-14 (1024-d): use it with CLIP_MODEL=laion/CLIP-ViT-H-14-laion2B-s32B-b79K.
#                   Requires NSFW_HEAD_SHA256. kiln: --nsfw-head /models/nsfw/head.pth
ARG CLIP_MODEL=timm/vit_base_patch32_clip_224.openai
ARG CLIP_REVISION=main
ARG T5_MODEL=google/t5-v1_1-xxl
ARG T5_REVISION=main
ARG TOXICITY_MODEL=original
ARG TOXICITY_SHA256=
ARG NSFW_HEAD_URL=
ARG NSFW_HEAD_SHA256=

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

# Download the models (the only step with network access to model hosts), record their sha256.
RUN <<'EOF'
set -eu
python - <<'PY'
import hashlib, json, os, pathlib, shutil, sys

import torch
from huggingface_hub import snapshot_download

out = pathlib.Path("/models")
out.mkdir(parents=True, exist_ok=True)
record = {}


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def note(name, folder, **extra):
    files = {str(p.relative_to(folder)): sha256(p) for p in sorted(pathlib.Path(folder).rglob("*")) if p.is_file()}
    record[name] = {"files": files, **extra}


# CLIP, in open_clip's local-dir layout, safetensors only.
clip_dir = out / "clip"
snapshot_download(os.environ["CLIP_MODEL"], revision=os.environ["CLIP_REVISION"], local_dir=clip_dir,
                  allow_patterns=["open_clip_config.json", "open_clip_model.safetensors"])
for need in ("open_clip_config.json", "open_clip_model.safetensors"):
    if not (clip_dir / need).is_file():
        sys.exit(f"{os.environ['CLIP_MODEL']} has no {need}: not an open_clip hub repo")
shutil.rmtree(clip_dir / ".cache", ignore_errors=True)
note("clip", clip_dir, repo=os.environ["CLIP_MODEL"], revision=os.environ["CLIP_REVISION"])

# T5: encoder only, safetensors, bfloat16 (kiln computes in bfloat16 on CUDA anyway).
from transformers import AutoTokenizer, T5EncoderModel

t5_src = snapshot_download(os.environ["T5_MODEL"], revision=os.environ["T5_REVISION"],
                           allow_patterns=["*.json", "*.model", "*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin"])
model = T5EncoderModel.from_pretrained(t5_src, dtype=torch.bfloat16)
model.save_pretrained(out / "t5", safe_serialization=True)
AutoTokenizer.from_pretrained(t5_src).save_pretrained(out / "t5")
del model
note("t5", out / "t5", repo=os.environ["T5_MODEL"], revision=os.environ["T5_REVISION"], stored_dtype="bfloat16")

# Detoxify: the release checkpoint (hash prefix in its name, checked by torch.hub), plus the
# transformers config and tokenizer of its architecture, in the folder layout `local:` loads.
from detoxify.detoxify import MODEL_URLS
from transformers import AutoConfig

url = MODEL_URLS[os.environ["TOXICITY_MODEL"]]
tox_dir = out / "toxicity"
tox_dir.mkdir(exist_ok=True)
ckpt = tox_dir / "checkpoint.ckpt"
prefix = url.rsplit("-", 1)[-1].split(".")[0]
torch.hub.download_url_to_file(url, str(ckpt), hash_prefix=prefix, progress=False)
if os.environ.get("TOXICITY_SHA256") and sha256(ckpt) != os.environ["TOXICITY_SHA256"]:
    sys.exit(f"{url}: sha256 {sha256(ckpt)} != TOXICITY_SHA256")
cfg = torch.load(ckpt, map_location="cpu", weights_only=True)["config"]["arch"]["args"]
AutoConfig.from_pretrained(cfg["model_type"]).save_pretrained(tox_dir)
AutoTokenizer.from_pretrained(cfg.get("tokenizer_name") or cfg["model_type"]).save_pretrained(tox_dir)
note("toxicity", tox_dir, url=url)

# NSFW head (optional).
url = os.environ.get("NSFW_HEAD_URL", "")
if url:
    want = os.environ.get("NSFW_HEAD_SHA256", "")
    if not want:
        sys.exit("NSFW_HEAD_URL needs NSFW_HEAD_SHA256")
    (out / "nsfw").mkdir(exist_ok=True)
    dst = out / "nsfw" / ("head.safetensors" if url.endswith(".safetensors") else "head.pth")
    torch.hub.download_url_to_file(url, str(dst), progress=False)
    if sha256(dst) != want:
        sys.exit(f"{url}: sha256 {sha256(dst)} != NSFW_HEAD_SHA256 {want}")
    note("nsfw", out / "nsfw", url=url)

(out / "MODELS.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
print(json.dumps({k: len(v["files"]) for k, v in record.items()}))
PY
rm -rf /root/.cache/huggingface /root/.cache/torch
EOF

# Run time: nothing reaches a model hub; transformers/open_clip read only /models.
ENV HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HF_HOME=/models/hf-home

# The Beam SDK image's ENTRYPOINT (/opt/apache/beam/boot) is kept: it starts the SDK harness.
