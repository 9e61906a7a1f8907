"""`kiln prepare`'s flags, in a module light enough for `kiln --help` to import at once."""

from __future__ import annotations

import argparse

from pipeline.image import DEFAULT_MAX_PIXELS, ENCODE_FORMATS, RESIZE_MODES

# Flags that change what lands in the output. A partial output is only resumed with the same
# values (and the same input files); anything else needs --overwrite.
RESULT_FLAGS = (
    "samples_per_shard", "image_size", "resize_mode", "downscale_interpolation", "upscale_interpolation",
    "allow_upscale", "encode_format", "encode_quality", "min_image_size", "max_aspect_ratio",
    "max_image_pixels", "min_caption_chars", "max_caption_chars", "download_timeout", "retries",
    "max_redirects", "max_bytes", "user_agent_token", "disallowed_directives", "allow_hosts", "jpeg_draft",
    "toxicity", "toxicity_model", "max_toxicity", "toxicity_labels", "clip", "clip_model", "min_clip_similarity",
    "nsfw", "nsfw_head", "max_punsafe", "t5", "t5_model", "t5_max_length",
)
FILTER_MODES = ("filter", "score", "off")


def add_prepare_args(p: argparse.ArgumentParser) -> None:
    io_ = p.add_argument_group("input / output")
    io_.add_argument("--input", required=True, help="metadata parquet file or glob (local, gs://, s3:// via Beam filesystems)")
    io_.add_argument("--output", required=True, help="dataset directory to write")
    io_.add_argument("--samples-per-shard", type=int, default=10_000, help="target kept+rejected candidates per shard (shards are uid ranges) [10000]")
    io_.add_argument("--overwrite", action="store_true", help="delete an existing output first instead of skipping / resuming it")
    io_.add_argument("--options", default=None, metavar="YAML",
                     help="a beam_options/*.yaml file: Beam flags, and kiln defaults under 'kiln:'; flags on the command line win")
    io_.add_argument("--no-card", dest="card", action="store_false", help="do not write the dataset card (README.md + card_plots/)")
    pre = p.add_argument_group("prefilter (metadata only, before any download)")
    pre.add_argument("--min-caption-chars", type=int, default=3)
    pre.add_argument("--max-caption-chars", type=int, default=1000)
    pre.add_argument("--min-image-size", type=int, default=64, help="shorter side in px, declared and decoded [64]")
    pre.add_argument("--max-aspect-ratio", type=float, default=3.0, help="long/short side, declared and decoded [3.0]")
    dl = p.add_argument_group("download")
    dl.add_argument("--download-timeout", type=float, default=20.0, help="total deadline per URL in seconds: redirects, retries, body [20]")
    dl.add_argument("--connect-timeout", type=float, default=5.0)
    dl.add_argument("--retries", type=int, default=2, help="extra attempts on 429/5xx/connection errors, honouring Retry-After [2]")
    dl.add_argument("--max-redirects", type=int, default=5)
    dl.add_argument("--max-bytes", type=int, default=32 * 2**20, help="byte cap per image [32 MiB]")
    dl.add_argument("--per-host-concurrency", type=int, default=16, help="simultaneous requests per host:port per worker [16]")
    dl.add_argument("--download-threads", type=int, default=64, help="requests in flight per worker process [64]")
    dl.add_argument("--user-agent-token", default="kiln", help="our bot token, for UA-scoped X-Robots-Tag directives [kiln]")
    dl.add_argument("--disallowed-directives", default="noai,noimageai,noindex,noimageindex", help="X-Robots-Tag directives that opt an image out")
    dl.add_argument("--allow-hosts", default="", help="comma-separated exact host:port pairs allowed despite a non-public address (tests, demo)")
    im = p.add_argument_group("decode / resize")
    im.add_argument("--image-size", type=int, default=1024, help="stored size in px (never upscaled) [1024]")
    im.add_argument("--resize-mode", default="center_crop", choices=RESIZE_MODES)
    im.add_argument("--downscale-interpolation", default="area")
    im.add_argument("--upscale-interpolation", default="lanczos")
    im.add_argument("--allow-upscale", action="store_true", help="upscale small images to --image-size (off: DESIGN.md)")
    im.add_argument("--encode-format", default="jpg", choices=tuple(ENCODE_FORMATS))
    im.add_argument("--encode-quality", type=int, default=95)
    im.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="decompression-bomb limit from the header [178956970]")
    im.add_argument("--no-jpeg-draft", dest="jpeg_draft", action="store_false", help="decode JPEGs at full size before resizing")
    im.add_argument("--decode-threads", type=int, default=2, help="decode/resize threads per worker process [2]")
    mf = p.add_argument_group(
        "model filters",
        "each filter is 'filter' (score and reject), 'score' (record scores, reject nothing) or 'off'",
    )
    mf.add_argument("--toxicity", default="filter", choices=FILTER_MODES, help="caption toxicity (Detoxify), before any download [filter]")
    mf.add_argument("--toxicity-model", default="original", help="Detoxify model: original | unbiased | multilingual | local:DIR [original]")
    mf.add_argument("--max-toxicity", type=float, default=0.5, help="reject above this max over --toxicity-labels [0.5]")
    mf.add_argument("--toxicity-labels", default="", help="comma-separated Detoxify labels to take the max over [all of the model's]")
    mf.add_argument("--clip", default="filter", choices=FILTER_MODES, help="CLIP image-caption similarity, after decode [filter]")
    mf.add_argument("--clip-model", default="ViT-B-32:openai", help="open_clip NAME:PRETRAINED | local-dir:DIR | hf-hub:ORG/REPO [ViT-B-32:openai]")
    mf.add_argument("--min-clip-similarity", type=float, default=0.28, help="reject below this cosine similarity (LAION-5B English: 0.28) [0.28]")
    mf.add_argument("--nsfw", default="filter", choices=FILTER_MODES, help="LAION's NSFW head on the CLIP image embedding [filter]")
    mf.add_argument("--nsfw-head", default=None, help="NSFW head weights (.safetensors, or .pt loaded weights_only) sized for --clip-model")
    mf.add_argument("--max-punsafe", type=float, default=0.5, help="reject above this punsafe (LAION's recommended cut) [0.5]")
    te = p.add_argument_group("text embedding (frozen T5, survivors only)")
    te.add_argument("--t5", default="embed", choices=("embed", "off"), help="store each kept caption's T5 embedding [embed]")
    te.add_argument("--t5-model", default="google/t5-v1_1-xxl", help="hub id in the local HF cache, or local:DIR [google/t5-v1_1-xxl]")
    te.add_argument("--t5-max-length", type=int, default=128, help="tokens kept per caption, EOS included (Imagen: 128) [128]")
    te.add_argument("--t5-max-tokens", type=int, default=None, help="padded tokens per T5 forward pass [4096 CPU, 16384 CUDA]")
    te.add_argument("--t5-cross-process", action="store_true",
                    help="one T5 per machine shared by all worker processes (Beam MultiProcessShared), e.g. on a GPU VM")
    mf.add_argument("--model-batch-size", type=int, default=64, help="batch size through each model [64]")
    mf.add_argument("--device", default=None, help="torch device for the models [cuda if available, else cpu]")
    mf.add_argument("--gpu-resource-hint", default=None, metavar="HINT",
                    help="Beam accelerator resource hint for the model stages only (Dataflow format, e.g. "
                         "'type:nvidia-l4;count:1;install-nvidia-driver'); not on Download or the writers [none]")
    p.add_argument("--quiet", action="store_true", help="no progress / funnel printout")
