"""`kiln prepare`: LAION-style metadata parquet -> accounted webdataset + Parquet shards.

    metadata ─► ReadMetadata ─► AssignUid ─► Prefilter (row checks, dedup by uid)
             ─► RouteToShard ─► SkipDoneShards ─► Download ─► Decode ─► Resize ─► WriteShards
    every stage's rejects ─► RouteToShard ─► WriteShards (rejects/NNNNNN.parquet)
    then (driver): accounting from the files ─► manifest.json ─► stats.json ─► _SUCCESS

Run `kiln prepare --help` for the flags; any flag kiln does not know is passed to Beam
(`--runner`, `--direct_running_mode=multi_processing`, `--direct_num_workers=2`, Dataflow flags).
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import math
import platform
import subprocess
import sys
import time
from pathlib import Path

import apache_beam as beam
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions

from pipeline import __version__
from pipeline.beam_yaml import hinted, model_stage_hints
from pipeline.decode import Decode, DecodeConfig, Resize
from pipeline.finalize import AccountingError, build_manifest, check_accounting, count_input_rows, funnel_from, match, read_footers, write_json
from pipeline.image import ResizeConfig
from pipeline.options import RESULT_FLAGS
from pipeline.model_stages import CaptionToxicity, EmbedT5, ImageFilterConfig, ImageFilters, T5Config, ToxicityConfig
from pipeline.prefilter import Prefilter, PrefilterConfig
from pipeline.progress import LocalProgress, ProgressPrinter, tap, tap_all
from pipeline.records import compute_uid
from pipeline.write import WriteShards, meta_schema, rejects_schema, shard_of

def toxicity_config(args) -> ToxicityConfig:
    return ToxicityConfig(
        mode=args.toxicity,
        model=args.toxicity_model,
        max_toxicity=args.max_toxicity,
        labels=tuple(x.strip() for x in args.toxicity_labels.split(",") if x.strip()),
        batch_size=args.model_batch_size,
        device=args.device,
    )


def image_filter_config(args) -> ImageFilterConfig:
    if args.nsfw != "off" and args.clip == "off":
        raise SystemExit("kiln prepare: --nsfw needs the CLIP image embedding: use --clip score (or filter), or --nsfw off")
    return ImageFilterConfig(
        clip_mode=args.clip,
        clip_model=args.clip_model,
        min_clip_similarity=args.min_clip_similarity,
        nsfw_mode=args.nsfw,
        nsfw_head=args.nsfw_head,
        max_punsafe=args.max_punsafe,
        batch_size=args.model_batch_size,
        device=args.device,
    )


def t5_config(args) -> T5Config:
    return T5Config(model=args.t5_model, max_length=args.t5_max_length, max_tokens=args.t5_max_tokens,
                    device=args.device, cross_process=args.t5_cross_process)


def stage_modes(args) -> dict:
    """What each stage did in this run (the card and the funnel say which filters were active)."""
    return {"prefilter": "filter", "toxicity": args.toxicity, "download": "filter", "decode": "filter",
            "resize": "filter", "clip": args.clip, "nsfw": args.nsfw, "t5": "off" if args.t5 == "off" else "embed"}


def describe_models(args) -> dict:
    """Load every enabled model once in the driver: a bad spec, a missing file or a mismatched NSFW
    head fails here, before any worker starts, and each model's source and sha256 go to stats.json."""
    models = {}
    if args.toxicity != "off":
        from pipeline.model_stages import load_toxicity

        models["toxicity"] = load_toxicity(toxicity_config(args)).source
    if args.clip != "off":
        from pipeline.model_stages import load_image_models

        clip, nsfw = load_image_models(image_filter_config(args))
        models["clip"] = clip.source
        if nsfw is not None:
            models["nsfw"] = nsfw.source
    if args.t5 != "off":
        from embed.t5 import resolve_model_dir, weights_sha256, weight_files

        # Hash the weights without loading the model: T5-XXL in the driver would cost minutes.
        model_dir = resolve_model_dir(args.t5_model)
        main_file, _ = weight_files(model_dir)
        models["t5"] = {"spec": args.t5_model, "model_dir": str(model_dir), "weights_path": str(main_file),
                        "sha256": weights_sha256(model_dir), "max_length": args.t5_max_length,
                        "d_model": json.loads((model_dir / "config.json").read_text()).get("d_model"),
                        "stored_dtype": "float16"}
    return models


def config_fingerprint(args, input_files: list[dict]) -> str:
    payload = {"flags": {k: getattr(args, k) for k in RESULT_FLAGS}, "inputs": [[f["path"], f["bytes"], f["rows"]] for f in input_files]}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _fetch_config(args):
    from pipeline.fetch import FetchConfig, parse_allow_hosts

    return FetchConfig(
        timeout_s=args.download_timeout,
        connect_timeout_s=min(args.connect_timeout, args.download_timeout),
        max_bytes=args.max_bytes,
        max_redirects=args.max_redirects,
        retries=args.retries,
        per_host_concurrency=args.per_host_concurrency,
        user_agent_token=args.user_agent_token,
        disallowed_directives=tuple(d.strip().lower() for d in args.disallowed_directives.split(",") if d.strip()),
        allow_hosts=parse_allow_hosts(args.allow_hosts),
    )


class _AssignUid(beam.DoFn):
    def __init__(self, url_column, caption_column):
        self.url_column, self.caption_column = url_column, caption_column

    def setup(self):
        self.n_read = Metrics.counter("kiln", "read/rows")

    def process(self, row):
        self.n_read.inc()
        row = dict(row)  # never mutate an element another transform may also hold
        row["uid"] = compute_uid(row.get(self.url_column), row.get(self.caption_column))
        yield row


class _Route(beam.DoFn):
    """Attach the shard number and drop rows whose shard is already complete on disk."""

    def __init__(self, done_shards: frozenset):
        self.done = done_shards

    def process(self, record, num_shards):
        record = dict(record)
        record["shard"] = shard_of(record["uid"], num_shards)
        if record["shard"] not in self.done:
            yield record


def build_pipeline(p, args, input_schema, done_shards: frozenset, fingerprint: str, progress_dir: str | None = None):
    """Compose the job's labelled transforms on pipeline `p` (a TestPipeline in tests).

    `progress_dir`: where the progress taps of a local run write their counts (pipeline.progress).
    A `gpu_resource_hint` on args puts Beam's accelerator hint on the three model stages only."""
    pre_cfg = PrefilterConfig(
        min_caption_chars=args.min_caption_chars,
        max_caption_chars=args.max_caption_chars,
        min_image_size=args.min_image_size,
        max_aspect_ratio=args.max_aspect_ratio,
    )
    resize_cfg = ResizeConfig(
        image_size=args.image_size,
        resize_mode=args.resize_mode,
        downscale_interpolation=args.downscale_interpolation,
        upscale_interpolation=args.upscale_interpolation,
        allow_upscale=args.allow_upscale,
        encode_format=args.encode_format,
        encode_quality=args.encode_quality,
    )
    decode_cfg = DecodeConfig(
        max_pixels=args.max_image_pixels,
        min_image_size=args.min_image_size,
        max_aspect_ratio=args.max_aspect_ratio,
        draft_target=args.image_size if (args.jpeg_draft and args.resize_mode in ("center_crop", "keep_ratio") and not args.allow_upscale) else None,
    )
    sps = args.samples_per_shard

    rows = (
        p
        | "ReadMetadata" >> beam.io.ReadFromParquet(args.input)
        | "AssignUid" >> beam.ParDo(_AssignUid(pre_cfg.url_column, pre_cfg.caption_column))
    )
    rows = tap(rows, progress_dir, "read")
    gpu = model_stage_hints(args)  # {} unless --gpu-resource-hint / the options file's kiln: gpu_resource_hint
    pre = rows | "Prefilter" >> Prefilter(pre_cfg)
    num_shards = (
        pre["main"]
        | "CountCandidates" >> beam.combiners.Count.Globally()
        | "NumShards" >> beam.Map(lambda n: max(1, math.ceil(n / sps)))
    )
    n_side = beam.pvalue.AsSingleton(num_shards)
    todo = pre["main"] | "RouteToShard" >> beam.ParDo(_Route(done_shards), n_side)
    pre_rejects = pre["rejects"] | "RoutePrefilterRejects" >> beam.ParDo(_Route(done_shards), n_side)

    stage_rejects = [pre_rejects]
    to_download = todo
    if args.toxicity != "off":
        toxicity = todo | "CaptionToxicity" >> hinted(CaptionToxicity(toxicity_config(args)), gpu)
        to_download = toxicity["main"]
        stage_rejects.append(toxicity["rejects"])
    downloaded = to_download | "Download" >> _download(args)
    decoded = downloaded["main"] | "Decode" >> Decode(decode_cfg, threads=args.decode_threads)
    resized = decoded["main"] | "Resize" >> Resize(resize_cfg, threads=args.decode_threads)
    stage_rejects += [downloaded["rejects"], decoded["rejects"], resized["rejects"]]
    kept = resized["main"]
    if args.clip != "off":
        scored = kept | "ImageFilters" >> hinted(ImageFilters(image_filter_config(args)), gpu)
        kept = scored["main"]
        stage_rejects.append(scored["rejects"])
    if args.t5 != "off":
        embedded = kept | "EmbedT5" >> hinted(EmbedT5(t5_config(args)), gpu)
        kept = embedded["main"]
        stage_rejects.append(embedded["rejects"])

    expected = (
        todo
        | "KeyCandidates" >> beam.Map(lambda r: (r["shard"], 1))
        | "CountPerShard" >> beam.CombinePerKey(sum)
        | "TagExpected" >> beam.MapTuple(lambda shard, n: (shard, ("expect", n)))
    )
    # Every shard gets a group, so a shard whose rows were all rejected still gets its files.
    every_shard = (
        p
        | "Once" >> beam.Create([None])
        | "AllShards" >> beam.FlatMap(lambda _, n: [(i, ("expect", 0)) for i in range(n) if i not in done_shards], n_side)
    )
    samples = tap(kept, progress_dir, "kept") | "KeySamples" >> beam.Map(lambda r: (r["shard"], ("sample", r)))
    rejects = (
        tap_all(stage_rejects, progress_dir, "rejected")
        | "AllRejects" >> beam.Flatten()
        | "KeyRejects" >> beam.Map(lambda r: (r["shard"], ("reject", r)))
    )
    return (
        (samples, rejects, expected, every_shard)
        | "Gather" >> beam.Flatten()
        | "WriteShards" >> WriteShards(args.output, meta_schema(input_schema), rejects_schema(input_schema), num_shards,
                                        image_ext=args.encode_format, caption_column=pre_cfg.caption_column, config_fingerprint=fingerprint)
    )


def _download(args):
    from pipeline.download import Download

    return Download(_fetch_config(args), max_in_flight=args.download_threads)


def _versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version(), "kiln": __version__}
    for pkg in ("apache-beam", "pyarrow", "pillow", "numpy", "opencv-python-headless", "img2dataset", "webdataset", "torch"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def _git_commit() -> str | None:
    try:
        here = Path(__file__).resolve().parent.parent
        return subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5).stdout.strip() or None
    except Exception:  # noqa: BLE001 - not a git checkout
        return None


def _counters(result) -> dict:
    try:
        res = result.metrics().query(MetricsFilter().with_namespace("kiln"))
    except Exception:  # noqa: BLE001 - some runners do not report metrics
        return {}
    out = {}
    for c in res["counters"]:
        value = c.committed if c.committed is not None else c.attempted
        out[c.key.metric.name] = out.get(c.key.metric.name, 0) + (value or 0)
    return dict(sorted(out.items()))


def _clear_output(output: str) -> None:
    paths = [m.path for pat in ("shards/*", "meta/*", "rejects/*", "manifest.json", "stats.json", "_SUCCESS") for m in match(f"{output}/{pat}")]
    if paths:
        FileSystems.delete(paths)


def _remove_temp_files(output: str) -> None:
    stale = [m.path for sub in ("shards", "meta", "rejects") for m in match(f"{output}/{sub}/*.tmp-*")]
    if stale:
        FileSystems.delete(stale)


def run(args: argparse.Namespace, beam_argv: list[str], test_pipeline=None) -> dict:
    """Run the job and finalize it; returns stats. Raises AccountingError if rows went missing."""
    started = dt.datetime.now(dt.timezone.utc)
    t0 = time.time()
    output = args.output.rstrip("/")
    input_rows, input_files = count_input_rows(args.input)
    if not input_files:
        raise SystemExit(f"kiln prepare: no input files match {args.input!r}")
    input_schema = pq.read_schema(FileSystems.open(input_files[0]["path"]))
    for f in input_files[1:]:
        other = pq.read_schema(FileSystems.open(f["path"]))
        if not other.equals(input_schema, check_metadata=False):
            raise SystemExit(f"kiln prepare: {f['path']} has a different schema from {input_files[0]['path']}:\n{other}\nvs\n{input_schema}")
    for col in ("URL", "TEXT"):
        if col not in input_schema.names:
            raise SystemExit(f"kiln prepare: input has no {col!r} column (columns: {input_schema.names})")
    fingerprint = config_fingerprint(args, input_files)

    if args.overwrite:
        _clear_output(output)
    elif FileSystems.exists(f"{output}/_SUCCESS"):
        stats = json.loads(FileSystems.open(f"{output}/stats.json").read())
        if stats.get("config_fingerprint") != fingerprint:
            raise SystemExit(
                f"kiln prepare: {output} is complete but was made from other input files or settings "
                f"(fingerprint {stats.get('config_fingerprint')} != {fingerprint}); use --overwrite or another --output"
            )
        if not args.quiet:
            print(f"kiln prepare: {output} is already complete (_SUCCESS); nothing to do. Use --overwrite to redo it.")
        stats["this_run"] = {"skipped": True}
        return stats
    _remove_temp_files(output)
    footers = read_footers(output)
    stale = sorted({f["config_fingerprint"] for f in footers.values()} - {fingerprint})
    if stale:
        raise SystemExit(
            f"kiln prepare: {output} holds shards made from other input files or settings "
            f"(fingerprints {stale}, this run {fingerprint}); use --overwrite or another --output"
        )
    done = frozenset(footers)
    if done and not args.quiet:
        print(f"kiln prepare: resuming {output}: {len(done)} shard(s) already complete are skipped")

    models = describe_models(args)
    options = PipelineOptions(beam_argv)
    p = test_pipeline if test_pipeline is not None else beam.Pipeline(options=options)
    # Progress: local runs count rows with taps (the DirectRunner's run() blocks, so its metrics
    # cannot be polled); a runner whose run() returns at once (Dataflow) is polled for its counters.
    progress = LocalProgress.for_run(options, enabled=not args.quiet)
    build_pipeline(p, args, input_schema, done, fingerprint, progress_dir=progress.dir if progress else None)
    printer = progress.printer(input_rows).start() if progress else None
    try:
        result = p.run()
        if printer is None and not args.quiet:
            printer = ProgressPrinter(result, input_rows, interval_s=30).start()
        result.wait_until_finish()
    finally:
        if printer is not None:
            printer.stop()
        if progress is not None:
            progress.close()
    counters = _counters(result)

    footers = read_footers(output)
    stats = {
        "kiln_version": __version__,
        "git_commit": _git_commit(),
        "config_fingerprint": fingerprint,
        "started_at": started.isoformat(),
        "input": {"pattern": args.input, "files": input_files, "rows": input_rows},
        "flags": {k: v for k, v in sorted(vars(args).items()) if k not in ("func",)},
        "stage_modes": stage_modes(args),
        "models": models,
        "beam_options": options.get_all_options(drop_default=True),
        "versions": _versions(),
        "this_run": {
            "shards_skipped": len(done),
            "shards_written": counters.get("write/shards"),
            "counters": counters,
            "stage_busy_s": {k.split("/")[0]: v / 1000 for k, v in counters.items() if k.endswith("/busy_ms")},
        },
    }
    try:
        accounting = check_accounting(output, input_rows, footers, counters if not done else {"read/rows": counters.get("read/rows")})
    except AccountingError as err:
        stats["accounting"] = err.result
        stats["finished_at"] = dt.datetime.now(dt.timezone.utc).isoformat()
        write_json(f"{output}/stats.json", stats)
        raise
    funnel = funnel_from(input_rows, footers, stage_modes(args))
    stats.update(
        {
            "accounting": accounting,
            "funnel": funnel,
            "kept": accounting["kept"],
            "rejected": accounting["rejected"],
            "num_shards": len(footers),
            "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(),
            "duration_s": round(time.time() - t0, 3),
        }
    )
    write_json(f"{output}/manifest.json", build_manifest(footers))
    write_json(f"{output}/stats.json", stats)
    if args.card:
        from pipeline.card import write_card

        write_card(output)  # re-checks the files against stats.json; CardError fails the run
    with FileSystems.create(f"{output}/_SUCCESS") as f:
        f.write(b"")
    if not args.quiet:
        print_funnel(stats, output)
    return stats


def print_funnel(stats: dict, output: str) -> None:
    acc = stats["accounting"]
    n = acc["input_rows"]
    pct = lambda k: f"{100.0 * k / n:5.1f}%" if n else "  -  "  # noqa: E731
    print(f"\nkiln prepare: {n} input rows -> {acc['kept']} kept ({pct(acc['kept'])}), {acc['rejected']} rejected")
    for st in stats["funnel"]:
        print(f"  {st['stage']:<10} in {st['in']:>8}  out {st['out']:>8}  rejected {st['rejected']:>7}")
        for reason, k in sorted(st["reasons"].items(), key=lambda kv: -kv[1]):
            print(f"      {reason:<24} {k:>7}  {pct(k)}")
    print(f"  accounting: input rows == kept + rejected: {'OK' if acc['ok'] else 'FAILED'}")
    print(f"  shards:  {output}/shards/ ({stats['num_shards']} tar)   meta: {output}/meta/")
    print(f"  rejects: {output}/rejects/   stats: {output}/stats.json   manifest: {output}/manifest.json")


def main(args: argparse.Namespace, beam_argv: list[str]) -> int:
    from pipeline.card import CardError

    try:
        run(args, beam_argv)
    except (AccountingError, CardError) as err:
        print(f"kiln prepare: FAILED: {err}", file=sys.stderr)
        return 1
    return 0
