"""The model stages of `kiln prepare`: caption toxicity, and CLIP similarity + NSFW on one image pass.

Each is a labelled PTransform over batches (BatchElements) whose DoFn holds one model per worker
process, shared by all of that process's DoFn instances and threads through Beam's `Shared`
handle. The scoring itself is a pure function over (model, list of records) -- `score_captions`
and `score_images` -- that a test can call without Beam. A filter in "score" mode records its
scores and rejects nothing; "off" removes the stage from the graph.

The loaders (`load_*`) are where kiln's error rule (pipeline.errors) meets the model libraries: a
model flag naming something that cannot be loaded -- weights not on this machine, a folder without
its files, a truncated file, a pickle that carries code, a head of another width -- raises
`ModelError`, a UserError: the `kiln` command prints its one line (flag, path or id, what is wrong,
what to do) and exits 2. filters/ and embed/ raise their own `ModelLoadError` (they import nothing
from pipeline/); the loaders re-raise it as ModelError. Anything else keeps its traceback.
"""

from __future__ import annotations

import contextlib
import json
import time

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.utils import shared

from embed.errors import ModelLoadError as _EmbedModelLoadError
from filters.errors import ModelLoadError as _FiltersModelLoadError
from pipeline.config import ClipConfig, InputConfig, ModelsConfig, T5Config, ToxicityConfig
from pipeline.errors import UserError
from pipeline.records import SCORE_FIELDS, STAGE_CLIP, STAGE_NSFW, STAGE_T5, STAGE_TOXICITY, Reject, reject_row
from pipeline.stage import StageCounters
from pipeline.t5store import FORMATS

# -- pure scoring functions ------------------------------------------------------------------


def score_captions(scorer, records: list[dict], cfg: ToxicityConfig, caption_col: str = "TEXT") -> list[tuple[dict, Reject | None]]:
    """Add toxicity scores to each record; in filter mode, reject those above the threshold."""
    labels = list(cfg.labels) or list(scorer.labels)
    unknown = [lab for lab in labels if lab not in scorer.labels]
    if unknown:
        raise ValueError(f"--toxicity-labels {unknown} not produced by the model (it has {scorer.labels})")
    idx = [scorer.labels.index(lab) for lab in labels]
    scores = scorer.score([str(r.get(caption_col) or "") for r in records]).scores
    out = []
    for record, row in zip(records, scores):
        record = dict(record)
        chosen = row[idx]
        k = int(np.argmax(chosen))
        record["toxicity"] = float(chosen[k])
        record["toxicity_label"] = labels[k]
        record["toxicity_scores"] = {lab: round(float(v), 6) for lab, v in zip(scorer.labels, row)}
        rej = None
        if cfg.mode == "filter" and record["toxicity"] > cfg.max_toxicity:
            rej = Reject(STAGE_TOXICITY, "toxic", f"{labels[k]} {record['toxicity']:.4f} > {cfg.max_toxicity}")
        out.append((record, rej))
    return out


_decode_pool = None


def _decode_for_clip(records: list[dict], size: int) -> list:
    """Pixels for CLIP, decoded from the stored image itself (DCT-reduced towards the model's input
    size). Carrying the resized array from the Resize stage instead would put megabytes per record
    on the wire wherever the GPU-hinted CLIP stage runs in another worker pool than Resize."""
    global _decode_pool
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.image import decode_image

    if _decode_pool is None:
        _decode_pool = ThreadPoolExecutor(2, thread_name_prefix="kiln-clip-decode")
    return list(_decode_pool.map(lambda r: decode_image(r["_image"], draft_target=size).bgr, records))


def score_images(models, records: list[dict], cfg: ClipConfig, caption_col: str = "TEXT") -> list[tuple[dict, Reject | None]]:
    """One CLIP image pass per batch: similarity to the caption, then punsafe from the same embedding."""
    clip, nsfw = models
    records = [dict(r) for r in records]
    pixels = _decode_for_clip(records, clip.image_size)
    scores = clip.score(pixels, [str(r.get(caption_col) or "") for r in records], channel_order="bgr")
    punsafe = nsfw.punsafe(scores.image_embedding) if nsfw is not None else None
    out = []
    for i, record in enumerate(records):
        record["clip_similarity"] = float(scores.similarity[i])
        # float16 keeps 3 significant digits of a unit vector's components: plenty for retrieval
        # and dedup, at half the bytes (SHARDS.md documents the layout).
        record["clip_image_embedding"] = scores.image_embedding[i].astype("<f2").tobytes()
        if punsafe is not None:
            record["punsafe"] = float(punsafe[i])
        rej = None
        if cfg.clip_mode == "filter" and record["clip_similarity"] < cfg.min_clip_similarity:
            rej = Reject(STAGE_CLIP, "clip_similarity_low", f"{record['clip_similarity']:.4f} < {cfg.min_clip_similarity}")
        elif punsafe is not None and cfg.nsfw_mode == "filter" and record["punsafe"] > cfg.max_punsafe:
            rej = Reject(STAGE_NSFW, "punsafe_high", f"{record['punsafe']:.4f} > {cfg.max_punsafe}")
        out.append((record, rej))
    return out


def embed_captions(embedder, records: list[dict], cfg: T5Config, caption_col: str = "TEXT") -> list[tuple[dict, Reject | None]]:
    """Attach each caption's unpadded float16 T5 embedding (`_t5`), its length and truncation flag.

    A batch in which some caption overflows float16 is re-run one caption at a time, so only the
    offending caption is rejected (with its text in the detail), never the whole batch.
    """
    captions = [str(r.get(caption_col) or "") for r in records]
    try:
        results = embedder.embed(captions)
    except ValueError:
        results = []
        for c in captions:
            try:
                results.append(embedder.embed([c])[0])
            except ValueError as err:
                results.append(err)
    out = []
    for record, res in zip(records, results):
        record = dict(record)
        if isinstance(res, Exception):
            out.append((record, Reject(STAGE_T5, "t5_fp16_overflow", str(res))))
            continue
        record["_t5"] = res.array
        record["t5_len"] = int(res.n_tokens)
        record["t5_truncated"] = bool(res.truncated)
        out.append((record, None))
    return out


# -- loaders (run once per worker process) ---------------------------------------------------


class ModelError(UserError, ValueError):
    """A model flag (--toxicity-model, --clip-model, --nsfw-head, --t5-model) names something kiln
    cannot load. One line: the flag, the path or id, what is wrong, what to do (exit 2)."""


@contextlib.contextmanager
def model_errors():
    """Re-raise filters'/embed's ModelLoadError (a bad model spec or file) as ModelError."""
    try:
        yield
    except (_FiltersModelLoadError, _EmbedModelLoadError) as err:
        raise ModelError(str(err)) from err


def load_toxicity(cfg: ToxicityConfig, models: ModelsConfig = ModelsConfig()):
    from pipeline.compat import ensure_torch_compat

    ensure_torch_compat()
    from filters.toxicity import ToxicityScorer

    with model_errors():
        return ToxicityScorer(cfg.model, device=models.device, batch_size=models.batch_size)


def load_image_models(cfg: ClipConfig, models: ModelsConfig = ModelsConfig()):
    from pipeline.compat import ensure_torch_compat

    ensure_torch_compat()
    from filters.clip_similarity import ClipScorer

    if cfg.nsfw_mode != "off" and not cfg.nsfw_head:  # before CLIP loads: pipeline.config checks it too
        raise ModelError("--nsfw needs --nsfw-head PATH (LAION's CLIP-based NSFW detector weights for --clip-model), "
                         "or pass --nsfw off")
    with model_errors():
        clip = ClipScorer.from_spec(cfg.clip_model, device=models.device, batch_size=models.batch_size)
        nsfw = None
        if cfg.nsfw_mode != "off":
            from filters.nsfw import NsfwScorer

            nsfw = NsfwScorer(cfg.nsfw_head, device=models.device)
            nsfw.check_compatible(clip.embed_dim, clip_name=cfg.clip_model)
    return clip, nsfw


def load_t5(cfg: T5Config, models: ModelsConfig = ModelsConfig()):
    from pipeline.compat import ensure_torch_compat

    ensure_torch_compat()
    from embed.t5 import T5Embedder

    with model_errors():
        return T5Embedder(cfg.model, device=models.device, max_length=cfg.max_length, max_tokens_per_batch=cfg.max_tokens)


def load_t5_source(cfg: T5Config) -> dict:
    """What stats.json records about the T5 model, without loading it (T5-XXL in the driver would
    cost minutes): its folder is checked (config.json, tokenizer, weights) and its weights hashed.
    A model that cannot be used -> ModelError."""
    from embed.t5 import resolve_model_dir, weight_files, weights_sha256

    with model_errors():
        model_dir = resolve_model_dir(cfg.model)  # checks config.json (JSON, T5), tokenizer and weights
        main_file, _ = weight_files(model_dir, cfg.model)
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
        return {"spec": cfg.model, "model_dir": str(model_dir), "weights_path": str(main_file),
                "sha256": weights_sha256(model_dir), "max_length": cfg.max_length, "d_model": config.get("d_model"),
                "stored_dtype": FORMATS[cfg.dtype][1], "store": cfg.store}


class _T5Server:
    """Builds the embedder inside Beam's MultiProcessShared server process (picklable by value)."""

    def __init__(self, cfg: T5Config, models: ModelsConfig):
        self.cfg, self.models = cfg, models

    def __call__(self):
        return load_t5(self.cfg, self.models)


class _Holder:
    """Shared.acquire needs a weak-referenceable object."""

    def __init__(self, model):
        self.model = model


class _ModelStageFn(beam.DoFn):
    def __init__(self, loader, score_fn, cfg, models: ModelsConfig, columns: InputConfig, stages: tuple[str, ...], handle: shared.Shared, tag: str):
        self.loader, self.score_fn, self.cfg, self.models, self.columns, self.stages = loader, score_fn, cfg, models, columns, stages
        self.handle, self.tag = handle, tag

    def setup(self):
        cfg, models, loader = self.cfg, self.models, self.loader
        if getattr(cfg, "cross_process", False):
            # One model per machine: every worker process talks to the copy in a shared server
            # process (a GPU holds one T5-XXL, not one per SDK worker process).
            from apache_beam.utils.multi_process_shared import MultiProcessShared

            self.model = MultiProcessShared(_T5Server(cfg, models), tag=self.tag, always_proxy=True).acquire()
        else:
            # One model per worker process: every DoFn instance (thread) in it gets the same object.
            self.model = self.handle.acquire(lambda: _Holder(loader(cfg, models)), tag=self.tag).model
        self.counters = {s: StageCounters(s) for s in self.stages}
        # Beam distributions hold integers: scores in thousandths, so Dataflow's UI shows their
        # min / mean / max live (e.g. score/clip_similarity_milli).
        self.score_dists = {name: Metrics.distribution("kiln", f"score/{name}_milli") for name in SCORE_FIELDS}

    def process(self, batch):
        t0 = time.perf_counter()
        try:
            results = self.score_fn(self.model, batch, self.cfg, self.columns.caption_col)
        except Exception as err:  # noqa: BLE001 - a batch the model cannot score is rejected, not lost
            stage = self.stages[0]
            results = [(r, Reject(stage, f"{stage}_error", f"{type(err).__name__}: {err}")) for r in batch]
            for r, _ in results:
                r.pop("_t5", None)
        self.counters[self.stages[0]].busy_ms.inc(int((time.perf_counter() - t0) * 1000))
        for record, rej in results:
            for name, dist in self.score_dists.items():
                if record.get(name) is not None:
                    dist.update(int(round(record[name] * 1000)))
            for stage in self.stages:
                c = self.counters[stage]
                c.n_in.inc()
                if rej is not None and rej.stage == stage:
                    c.reject(rej)
                    break
                c.n_out.inc()
            if rej is None:
                yield record
            else:
                yield beam.pvalue.TaggedOutput("rejects", reject_row(record, rej, self.columns.url_col, self.columns.id_col))


class _ModelStage(beam.PTransform):
    """`batch_size`: records per Beam batch (adaptive, up to it); with `element_size_fn`, the size
    of every Beam batch in that function's units instead (e.g. caption tokens), fixed."""

    def __init__(self, loader, score_fn, cfg, models: ModelsConfig, columns: InputConfig, stages, tag, batch_size=None,
                 element_size_fn=None):
        super().__init__()
        self.loader, self.score_fn, self.cfg, self.models, self.columns, self.stages, self.tag = loader, score_fn, cfg, models, columns, stages, tag
        self.batch_size = batch_size or models.batch_size
        self.element_size_fn = element_size_fn

    def expand(self, records):
        fn = _ModelStageFn(self.loader, self.score_fn, self.cfg, self.models, self.columns, self.stages, shared.Shared(), self.tag)
        if self.element_size_fn is None:
            batch = beam.BatchElements(min_batch_size=1, max_batch_size=self.batch_size)
        else:
            # min == max: every batch is filled to the budget (the last of a bundle holds the rest);
            # Beam's size-adaptive batching would start at one element and grow from there.
            batch = beam.BatchElements(min_batch_size=self.batch_size, max_batch_size=self.batch_size,
                                       element_size_fn=self.element_size_fn)
        out = (
            records
            | "Batch" >> batch
            | "Score" >> beam.ParDo(fn).with_outputs("rejects", main="main")
        )
        return {"main": out.main, "rejects": out.rejects}


def CaptionToxicity(cfg: ToxicityConfig, models: ModelsConfig, columns: InputConfig) -> _ModelStage:
    return _ModelStage(load_toxicity, score_captions, cfg, models, columns, (STAGE_TOXICITY,), tag=f"toxicity:{cfg.model}")


def ImageFilters(cfg: ClipConfig, models: ModelsConfig, columns: InputConfig) -> _ModelStage:
    stages = (STAGE_CLIP, STAGE_NSFW) if cfg.nsfw_mode != "off" else (STAGE_CLIP,)
    return _ModelStage(load_image_models, score_images, cfg, models, columns, stages, tag=f"clip:{cfg.clip_model}:{cfg.nsfw_head}")


# T5 batches are re-bucketed by length inside the encoder, so a Beam batch can be larger than the
# other models' (records per Beam batch, not padded tokens: --t5-max-tokens bounds those).
T5_RECORDS_PER_BATCH = 256
# With a GPU, a Beam batch is sized in caption tokens instead: 4 passes' worth (--t5-max-tokens).
# The encoder sorts a batch by length and runs one pass per padded width (embed.batching), so a
# batch of 256 captions -- ~4k tokens at web caption lengths -- makes ~18 passes of ~250 padded
# tokens each, far too small to fill a GPU with T5-XXL. At 65,536 tokens (~4,000 captions at a mean
# of 16 tokens) the same ~20 widths make passes of ~3,400 padded tokens on average, 68% of all
# padded tokens in passes of >= 4,096 (bench/gpu.py prints the plan; README "GPU").
T5_BATCH_PASSES = 4


def t5_batch_tokens(cfg: T5Config, models: ModelsConfig) -> int | None:
    """Caption tokens per Beam batch into EmbedT5 (--t5-batch-tokens), or None: batches of up to
    T5_RECORDS_PER_BATCH records. Unset: T5_BATCH_PASSES x the CUDA pass budget when the models run
    on a GPU (--device cuda..., a --gpu-resource-hint, or no --device and a GPU here), else None."""
    if cfg.batch_tokens is not None:
        if 0 < cfg.batch_tokens < cfg.max_length:
            from pipeline.config import ConfigError

            raise ConfigError(f"--t5-batch-tokens {cfg.batch_tokens} is below --t5-max-length {cfg.max_length}: a "
                              "batch must hold the longest caption (0: batches of 256 captions)")
        return cfg.batch_tokens or None
    if models.gpu_resource_hint:
        on_gpu = True
    elif models.device is not None:
        on_gpu = models.device.startswith("cuda")
    else:
        import torch

        on_gpu = torch.cuda.is_available()
    if not on_gpu:
        return None
    from embed.t5 import DEFAULT_MAX_TOKENS

    return T5_BATCH_PASSES * (cfg.max_tokens or DEFAULT_MAX_TOKENS["cuda"])


_token_counters: dict = {}


class CaptionTokenCount:
    """BatchElements' element_size_fn for EmbedT5: a record's caption tokens, counted by the T5
    model's own tokenizer exactly as the encoder will count them (embed.t5.CaptionTokens: cleaned,
    EOS included, capped at --t5-max-length). The tokenizer loads once per worker process, on first
    use; it is never pickled."""

    def __init__(self, cfg: T5Config, caption_col: str = "TEXT"):
        self.model, self.max_length, self.caption_col = cfg.model, cfg.max_length, caption_col

    def __call__(self, record: dict) -> int:
        key = (self.model, self.max_length)
        count = _token_counters.get(key)
        if count is None:
            from pipeline.compat import ensure_torch_compat

            ensure_torch_compat()  # transformers imports torchvision
            from embed.t5 import CaptionTokens

            with model_errors():
                count = _token_counters[key] = CaptionTokens(self.model, self.max_length)
        return count(str(record.get(self.caption_col) or ""))


def EmbedT5(cfg: T5Config, models: ModelsConfig, columns: InputConfig) -> _ModelStage:
    tokens = t5_batch_tokens(cfg, models)
    if tokens is None:
        return _ModelStage(load_t5, embed_captions, cfg, models, columns, (STAGE_T5,), tag=f"t5:{cfg.model}:{cfg.max_length}",
                           batch_size=max(T5_RECORDS_PER_BATCH, models.batch_size))
    return _ModelStage(load_t5, embed_captions, cfg, models, columns, (STAGE_T5,), tag=f"t5:{cfg.model}:{cfg.max_length}",
                       batch_size=tokens, element_size_fn=CaptionTokenCount(cfg, columns.caption_col))
