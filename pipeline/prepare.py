"""`kiln prepare`: LAION-style metadata parquet -> accounted webdataset + Parquet shards.

The job (`build_pipeline`), each step a labelled PTransform, cheapest filter first:

    metadata ─► ReadMetadata ─► AssignUid ─► Prefilter (row checks, dedup by uid)
             ─► RouteToShard (uid range; shards already complete on disk are dropped here)
             ─► Blocklist (--blocklist ids, URL hashes, domains) ─► OptOut (--optout-list, robots.txt
                and tdmrep.json, fetched once per origin: pipeline.optout)
             ─► CaptionToxicity (Detoxify, text only) ─► Download (X-Robots-Tag, tdm-reservation)
             ─► Decode (image hash blocklists, C2PA, PDQ) ─► Resize
             ─► ImageFilters (one CLIP image pass: similarity, then NSFW on the same embedding)
             ─► EmbedT5 (frozen T5, survivors only)
             ─► Dedup (--dedup exact/pdq/semantic, --decontaminate: pipeline.dedup; a global step)
             ─► WriteShards (tar, rejects, meta per shard)
    every stage's rejects ─► WriteShards (rejects/NNNNNN.parquet)

then, in the driver (`run`): the accounting from the files on disk (pipeline.finalize) ─►
manifest.json ─► stats.json ─► the dataset card (pipeline.card) ─► _SUCCESS.

The configuration is pipeline.config's tree; each stage receives its section as it is. Run
`kiln prepare --help` for the flags; any flag kiln does not know is passed to Beam (`--runner`,
`--direct_running_mode=multi_processing`, `--direct_num_workers=2`, Dataflow's flags).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import errno
import json
import logging
import math
import os
import platform
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import apache_beam as beam
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions

from pipeline import __version__
from pipeline.beam_yaml import hinted, model_stage_hints
from pipeline.config import ConfigError, PrepareConfig, command_line, fingerprint as config_fingerprint, flat
from pipeline.decode import Decode, Resize
from pipeline.errors import Interrupted, RunFailed, UserError, one_line
from pipeline.download import Download, top_hosts
from pipeline.finalize import AccountingError, build_manifest, check_accounting, funnel_from, read_footers, write_json
from pipeline.model_stages import CaptionToxicity, EmbedT5, ImageFilters, ModelError
from pipeline.optout import Blocklist, OptOut
from pipeline.prefilter import Prefilter
from pipeline.progress import LocalProgress, ProgressPrinter, job_metrics, tap, tap_all
from pipeline.outdir import check_output, clear_output, is_local, remove_temp_files
from pipeline.read import ReadMetadata, inspect_input
from pipeline.records import rejects_schema
from pipeline.write import WriteShards, meta_schema, shard_of


def resolve_models(cfg: PrepareConfig) -> tuple[PrepareConfig, dict, list]:
    """(cfg with every enabled model flag resolved to what its loader opens, provenance per role,
    [(role, UserError)] for the flags that resolve to nothing), through the one resolver
    (pipeline.models.resolve). Nothing is loaded here. A role that failed keeps its flag's value and,
    for the NSFW head, its stage off in the returned cfg (describe_models then loads the rest)."""
    from pipeline.models.resolve import resolve

    models_dir = cfg.models.models
    specs = {}
    if cfg.toxicity.mode != "off":
        specs["toxicity"] = cfg.toxicity.model
    if cfg.clip.clip_mode != "off":
        specs["clip"] = cfg.clip.clip_model
        if cfg.clip.nsfw_mode != "off":
            specs["nsfw"] = cfg.clip.nsfw_head
    if cfg.t5.mode != "off":
        specs["t5"] = cfg.t5.model
    resolved, errors = {}, []
    for role, spec in specs.items():
        try:
            resolved[role] = resolve(role, spec, models_dir)
        except UserError as err:
            errors.append((role, err))
    out = cfg
    if "toxicity" in resolved:
        out = dataclasses.replace(out, toxicity=dataclasses.replace(out.toxicity, model=resolved["toxicity"].loader_spec))
    if "clip" in resolved:
        clip = dataclasses.replace(out.clip, clip_model=resolved["clip"].loader_spec)
        if "nsfw" in resolved:
            clip = dataclasses.replace(clip, nsfw_head=resolved["nsfw"].loader_spec)
        elif "nsfw" in specs:
            clip = dataclasses.replace(clip, nsfw_mode="off")
        out = dataclasses.replace(out, clip=clip)
    if "t5" in resolved:
        out = dataclasses.replace(out, t5=dataclasses.replace(out.t5, model=resolved["t5"].loader_spec))
    return out, {role: r.record for role, r in resolved.items()}, errors


# The value of each model flag when the user leaves it alone (the laion400m-defaults set's models).
def _defaults() -> dict:
    from pipeline.config import ClipConfig, T5Config, ToxicityConfig

    return {"toxicity": ToxicityConfig().model, "clip": ClipConfig().clip_model, "nsfw": ClipConfig().nsfw_head,
            "t5": T5Config().model}


def _raise_model_errors(cfg: PrepareConfig, errors: list) -> None:
    """One line for every model that is not there: when they are the defaults (the newcomer's first
    run), the one command that fetches them all; otherwise the first problem (and how many more)."""
    from pipeline.models.resolve import ALIASES, DEFAULT_SET, FLAGS

    given = {"toxicity": cfg.toxicity.model, "clip": cfg.clip.clip_model, "nsfw": cfg.clip.nsfw_head, "t5": cfg.t5.model}
    order = list(FLAGS)
    errors = sorted(errors, key=lambda e: order.index(e[0]))
    defaults = _defaults()
    if all(given[role] == defaults[role] for role, _ in errors):
        missing = ", ".join(f"{FLAGS[role]} {ALIASES.get(given[role], given[role])}" for role, _ in errors)
        to = cfg.models.models or "models/"
        raise ModelError(f"the default models are not on this machine ({missing}): fetch them with "
                         f"`kiln models fetch {DEFAULT_SET} --to {to}` and re-run with --models {to} (or name your own "
                         f"with local:DIR, or turn a stage off: --toxicity off, --clip off, --nsfw off, --t5 off)")
    first = errors[0][1]
    if len(errors) == 1:
        raise first
    raise ModelError(f"{first} (and {len(errors) - 1} more model problem(s): fix this one and re-run to see them)") from first


def describe_models(cfg: PrepareConfig, provenance: dict | None = None, given: PrepareConfig | None = None,
                    errors: list | None = None) -> dict:
    """Load every enabled model once in the driver (`cfg` already resolved: resolve_models): a bad
    spec, a missing file or a mismatched NSFW head fails here, before any worker starts; each model's
    source, sha256 and provenance go to stats.json. Every model is tried, so the one line can name
    all that are missing (`errors`: the resolver's, for `given`, the config as the user gave it)."""
    from pipeline.model_stages import load_image_models, load_t5_source, load_toxicity

    models, errors = {}, list(errors or [])
    skip = {role for role, _ in errors}
    device = cfg.models.device
    if device and device.startswith("cuda") and any(m != "off" for m in (cfg.toxicity.mode, cfg.clip.clip_mode, cfg.t5.mode)):
        import torch

        if not torch.cuda.is_available() or (":" in device and int(device.split(":")[1]) >= torch.cuda.device_count()):
            raise ConfigError(f"--device {device}: this machine has {torch.cuda.device_count() if torch.cuda.is_available() else 'no'} "
                              f"CUDA device(s); pass --device cpu, or leave --device out (cuda if available, else cpu)")
    if cfg.toxicity.mode != "off" and "toxicity" not in skip:
        try:
            scorer = load_toxicity(cfg.toxicity, cfg.models)
            models["toxicity"] = scorer.source
            unknown = [lab for lab in cfg.toxicity.labels if lab not in scorer.labels]
            if unknown:
                raise ConfigError(f"--toxicity-labels {','.join(unknown)}: not a label of the toxicity model "
                                  f"(its labels: {','.join(scorer.labels)})")
        except ModelError as err:
            errors.append(("toxicity", err))
    if cfg.clip.clip_mode != "off" and "clip" not in skip:
        try:
            clip, nsfw = load_image_models(cfg.clip, cfg.models)
            models["clip"] = clip.source
            if nsfw is not None:
                models["nsfw"] = nsfw.source
        except ModelError as err:
            errors.append(("clip" if "--clip-model" in str(err) else "nsfw", err))
    if cfg.t5.mode != "off" and "t5" not in skip:
        try:
            models["t5"] = load_t5_source(cfg.t5)  # hashed, not loaded: T5-XXL in the driver would cost minutes
        except ModelError as err:
            errors.append(("t5", err))
    if errors:
        _raise_model_errors(given or cfg, errors)
    for role, record in (provenance or {}).items():
        if role in models:
            models[role] = {**models[role], "provenance": record}
    return models


class _Route(beam.DoFn):
    """Attach the shard number (the transient `shard` field) and drop rows whose shard is already
    complete on disk."""

    def __init__(self, done_shards: frozenset):
        self.done = done_shards

    def process(self, record, num_shards):
        record = dict(record)
        record["shard"] = shard_of(record["uid"], num_shards)
        if record["shard"] not in self.done:
            yield record


def build_pipeline(p, cfg: PrepareConfig, input_schema, done_shards: frozenset, fingerprint: str, progress_dir: str | None = None,
                   list_hashes: tuple = ()):
    """Compose the job's labelled transforms on pipeline `p` (a TestPipeline in tests).

    `progress_dir`: where the progress taps of a local run write their counts (pipeline.progress).
    `--gpu-resource-hint` puts Beam's accelerator hint on the three model stages only.
    `list_hashes`: sha256 of the --blocklist/--optout-list files as the driver read them (workers
    re-read the files and refuse to run on a changed one)."""
    columns = cfg.input
    sps = cfg.output.samples_per_shard

    rows = (
        p
        | "ReadMetadata" >> ReadMetadata(columns)
    )
    rows = tap(rows, progress_dir, "read")
    gpu = model_stage_hints(cfg.models)  # {} unless --gpu-resource-hint / the options file's kiln: gpu_resource_hint
    pre = rows | "Prefilter" >> Prefilter(cfg.prefilter, cfg.image, columns)
    num_shards = (
        pre["main"]
        | "CountCandidates" >> beam.combiners.Count.Globally()
        | "NumShards" >> beam.Map(lambda n: max(1, math.ceil(n / sps)))
    )
    n_side = beam.pvalue.AsSingleton(num_shards)
    todo = pre["main"] | "RouteToShard" >> beam.ParDo(_Route(done_shards), n_side)
    pre_rejects = pre["rejects"] | "RoutePrefilterRejects" >> beam.ParDo(_Route(done_shards), n_side)

    stage_rejects = [pre_rejects]
    consent = cfg.consent
    checked = todo
    if consent.blocklist:
        blocked = checked | "Blocklist" >> Blocklist(consent, list_hashes, columns)
        checked = blocked["main"]
        stage_rejects.append(blocked["rejects"])
    if consent.robots_txt or consent.tdmrep or consent.optout_list:
        opted = checked | "OptOut" >> OptOut(consent, list_hashes, cfg.download, columns)
        checked = opted["main"]
        stage_rejects.append(opted["rejects"])
    to_download = checked
    if cfg.toxicity.mode != "off":
        toxicity = checked | "CaptionToxicity" >> hinted(CaptionToxicity(cfg.toxicity, cfg.models, columns), gpu)
        to_download = toxicity["main"]
        stage_rejects.append(toxicity["rejects"])
    downloaded = to_download | "Download" >> Download(cfg.download, columns, consent)
    decoded = downloaded["main"] | "Decode" >> Decode(cfg.image, columns, consent=consent, expected_hashes=list_hashes)
    resized = decoded["main"] | "Resize" >> Resize(cfg.image, columns)
    stage_rejects += [downloaded["rejects"], decoded["rejects"], resized["rejects"]]
    kept = resized["main"]
    if cfg.clip.clip_mode != "off":
        scored = kept | "ImageFilters" >> hinted(ImageFilters(cfg.clip, cfg.models, columns), gpu)
        kept = scored["main"]
        stage_rejects.append(scored["rejects"])
    if cfg.t5.mode != "off":
        embedded = kept | "EmbedT5" >> hinted(EmbedT5(cfg.t5, cfg.models, columns), gpu)
        kept = embedded["main"]
        stage_rejects.append(embedded["rejects"])
    if cfg.dedup.enabled:
        from pipeline.dedup import ClipEmbedder, DedupStage, rules_of

        rules = rules_of(cfg.dedup)
        from pipeline.write import shard_name

        # A resumed run's written samples are kept and take part (pipeline.dedup: the same decisions).
        written = [f"{cfg.output.output.rstrip('/')}/meta/{shard_name(i)}.parquet" for i in sorted(done_shards)]
        loader = ClipEmbedder(cfg.clip, cfg.models) if rules.eval_cosine is not None else None
        deduped = kept | "Dedup" >> DedupStage(rules, columns, loader, written)
        kept = deduped["main"]
        stage_rejects.append(deduped["rejects"])

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
    id_type = input_schema.field(columns.id_col).type if columns.id_col in input_schema.names else None
    return (
        (samples, rejects, expected, every_shard)
        | "Gather" >> beam.Flatten()
        | "WriteShards" >> WriteShards(cfg.output.output, meta_schema(input_schema), rejects_schema(id_type), num_shards,
                                        image_ext=cfg.image.encode_format, caption_column=columns.caption_col, config_fingerprint=fingerprint,
                                        t5_store=cfg.t5.store, t5_dtype=cfg.t5.dtype)
    )


def consent_stats(cfg: PrepareConfig, counters: dict, blocklists, optout_lists) -> dict:
    """stats.json's "consent" object (its shape: pipeline.consent). Origin counts are this run's
    counters; rows removed are the funnel's."""
    from pipeline.fetch import DEFAULT_USER_AGENT

    c, dl = cfg.consent, cfg.download
    n = lambda name: counters.get(f"optout/{name}", 0)  # noqa: E731
    c2pa_reader = None
    if c.c2pa:
        from pipeline.c2pa_check import reader_version

        c2pa_reader = reader_version()
    return {
        "user_agent": DEFAULT_USER_AGENT,
        "user_agent_token": dl.user_agent_token,
        "protocols": {
            "robots_txt": {"enabled": c.robots_txt, "ai_tokens": list(c.ai_crawler_tokens), "ttl_s": c.rules_ttl_s,
                           "origins": n("origins") if c.robots_txt else 0, "origins_no_rules": n("robots_none"),
                           "origins_unavailable": n("robots_unavailable"), "on_unavailable": "disallow"},
            "tdmrep": {"enabled": c.tdmrep, "origins": n("origins") if c.tdmrep else 0, "origins_with_file": n("tdmrep_ok"),
                       "origins_unavailable": n("tdmrep_unavailable"), "on_unavailable": "reserve", "header": c.tdmrep},
            "x_robots_tag": {"enabled": c.x_robots_tag, "directives": list(dl.disallowed_directives) if c.x_robots_tag else []},
            "optout_list": {"enabled": bool(c.optout_list),
                            "files": [{"path": o.path, "sha256": o.sha256, "domains": len(o.domains), "prefixes": len(o.prefixes)}
                                      for o in optout_lists]},
            "c2pa": {"enabled": c.c2pa, "reader": c2pa_reader},
        },
        "blocklists": [{"name": b.name, "path": b.path, "sha256": b.sha256, "entries": b.counts(), "pdq_threshold": b.pdq_threshold}
                       for b in (blocklists.lists if blocklists else ())],
    }


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
        res = job_metrics(result).query(MetricsFilter().with_namespace("kiln"))  # not a progress poll's stale answer
    except Exception:  # noqa: BLE001 - some runners do not report metrics
        return {}
    out = {}
    for c in res["counters"]:
        value = c.committed if c.committed is not None else c.attempted
        out[c.key.metric.name] = out.get(c.key.metric.name, 0) + (value or 0)
    return dict(sorted(out.items()))


# What the machine says when the job cannot write (disk full, read-only, permissions): the run
# failed for a reason the user fixes, said in one line. Beam re-raises a worker's OSError as a
# RuntimeError naming it ("OSError: [Errno 28] No space left on device: '...' [while running ...]"),
# and a KeyboardInterrupt in a worker thread the same way.
_ENV_ERRNO = re.compile(r"\[Errno (\d+)\] ([^:\[]+)(?::\s*'([^']*)')?")
_ENV_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.EMFILE}


def _raise_as_user_error(err: BaseException, output: str) -> None:
    """Re-raise a job failure that is the user's to fix as Interrupted/KeyboardInterrupt/RunFailed;
    return for anything else (a bug keeps its traceback)."""
    if isinstance(err, KeyboardInterrupt):
        raise err
    if _SIGNALLED:  # Ctrl-C / SIGTERM reached a worker thread first; Beam re-raised it as RuntimeError
        raise (Interrupted("terminated (SIGTERM)") if _SIGNALLED[-1] == signal.SIGTERM else KeyboardInterrupt()) from None
    if "KeyboardInterrupt" in str(err)[:200]:
        raise KeyboardInterrupt() from None
    code, what, path = (err.errno, err.strerror, err.filename) if isinstance(err, OSError) else (None, None, None)
    if code is None:
        m = _ENV_ERRNO.search(str(err))
        if m:
            code, what, path = int(m.group(1)), m.group(2).strip(), m.group(3)
    if code in _ENV_ERRNOS:
        where = f" ({path})" if path else ""
        raise RunFailed(f"the job could not write{where}: {what}. Fix that (free space, permissions) and re-run the "
                        f"same command: the shards already complete in {output} are kept and skipped") from None


_SIGNALLED: list[int] = []


@contextlib.contextmanager
def _beam_errors_reported_once():
    """While the job runs: note Ctrl-C / SIGTERM (Beam turns them into RuntimeErrors in its worker
    threads), and keep Beam from logging a worker's exception with its traceback -- kiln reports it
    once, as one line for a user's problem, with the traceback for a bug (or with --debug)."""
    debug = os.environ.get("KILN_DEBUG", "").strip().lower() not in ("", "0", "false", "no")
    installed = {}
    if threading.current_thread() is threading.main_thread():
        def note(signum, frame, previous=None):
            _SIGNALLED.append(signum)
            raise Interrupted("terminated (SIGTERM)") if signum == signal.SIGTERM else KeyboardInterrupt()

        for sig in (signal.SIGINT, signal.SIGTERM):
            installed[sig] = signal.signal(sig, note)
    quiet = _DropLoggedWorkerErrors()
    loggers = [logging.getLogger(n) for n in ("apache_beam.runners.common", "apache_beam.runners.worker.sdk_worker",
                                             "apache_beam.runners.direct.executor")]
    if not debug:
        for lg in loggers:
            lg.addFilter(quiet)
    _SIGNALLED.clear()
    # multi_processing workers run in their own session: Ctrl-C in a terminal reaches the driver
    # only (not every worker, each printing its own traceback); the driver's shutdown stops them.
    from apache_beam.runners.portability import local_job_service

    previous_hook = threading.excepthook

    def thread_hook(args):
        if not _SIGNALLED or debug:  # a worker thread failing after Ctrl-C is the shutdown itself
            previous_hook(args)

    threading.excepthook = thread_hook
    popen_module = local_job_service.subprocess
    _OwnSessionSubprocess.debug = debug
    local_job_service.subprocess = _OwnSessionSubprocess
    if not debug:
        loggers.append(logging.getLogger("apache_beam.runners.portability.local_job_service"))
        quiet_worker = _DropWorkerChatter()
        loggers[-1].addFilter(quiet_worker)
    try:
        yield
    finally:
        local_job_service.subprocess = popen_module
        if not _SIGNALLED:  # else keep it: the workers' threads end after this returns
            threading.excepthook = previous_hook
        for sig, previous in installed.items():
            signal.signal(sig, previous)
        for lg in loggers:
            lg.removeFilter(quiet)
            for f in [f for f in lg.filters if isinstance(f, _DropWorkerChatter)]:
                lg.removeFilter(f)


class _OwnSessionSubprocess:
    """`subprocess` as Beam's local job service uses it, starting each worker in a new session."""

    def __getattr__(self, name):
        return getattr(subprocess, name)

    debug = False

    def Popen(self, *args, **kwargs):  # noqa: N802 - subprocess's name
        kwargs.setdefault("start_new_session", True)
        if not self.debug:
            # The worker's own log lines reach the driver through Beam's logging service (errors
            # with their tracebacks included); its stderr only repeats them, at INFO.
            kwargs.setdefault("stdout", subprocess.DEVNULL)
            kwargs.setdefault("stderr", subprocess.DEVNULL)
        return subprocess.Popen(*args, **kwargs)


_OwnSessionSubprocess = _OwnSessionSubprocess()


class _DropWorkerChatter(logging.Filter):
    """multi_processing workers' forwarded log lines below ERROR (their start-up notices)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR


class _DropLoggedWorkerErrors(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno >= logging.ERROR and record.exc_info)


def _read_stats(output: str) -> dict:
    """A finished output's stats.json (the resume check reads its fingerprint); ConfigError if it is
    not the JSON object kiln wrote."""
    path = f"{output}/stats.json"
    try:
        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
            stats = json.loads(f.read())
    except (OSError, ValueError) as err:
        stats = err
    if not isinstance(stats, dict):
        why = f"cannot be read ({one_line(stats)})" if isinstance(stats, Exception) else "is not a JSON object"
        raise ConfigError(f"{output} has _SUCCESS but its stats.json {why}: pass --overwrite to redo the dataset "
                          f"(kiln deletes only its own files), or choose another --output")
    return stats


def run(cfg: PrepareConfig, beam_argv: list[str], test_pipeline=None) -> dict:
    """Run the job and finalize it; returns stats. Raises ConfigError for a bad input or output,
    AccountingError if rows went missing."""
    started = dt.datetime.now(dt.timezone.utc)
    t0 = time.time()
    output = cfg.output.output.rstrip("/")
    quiet = cfg.output.quiet
    # Every check of the input and the output runs before any work (one line each: pipeline.read,
    # pipeline.outdir); nothing of the user's under --output is ever replaced or deleted.
    info = inspect_input(cfg.input.input, cfg.input)
    input_rows, input_files, input_schema = info.rows, info.files, info.schema
    from pipeline.optout import load_lists

    blocklists, optout_lists = load_lists(cfg.consent)  # a missing or malformed list file: one line, before any work
    hashes = tuple([b.sha256 for b in (blocklists.lists if blocklists else ())] + [o.sha256 for o in optout_lists])
    eval_digest = []
    if cfg.dedup.decontaminate:
        from pipeline.dedup import eval_set_digest

        eval_digest = [eval_set_digest(cfg.dedup.decontaminate)]  # a missing or empty eval set: one line, before any work
    fingerprint = config_fingerprint(cfg, input_files, list(hashes) + eval_digest)
    made_output = is_local(output) and not os.path.exists(output)
    check_output(output, cfg.output.overwrite, cfg.output.card)  # creates --output if missing

    if cfg.output.overwrite:
        clear_output(output)
    elif FileSystems.exists(f"{output}/_SUCCESS"):
        stats = _read_stats(output)
        if stats.get("config_fingerprint") != fingerprint:
            raise ConfigError(
                f"{output} is complete but was made from other input files or settings "
                f"(fingerprint {stats.get('config_fingerprint')} != {fingerprint}); use --overwrite or another --output"
            )
        if not quiet:
            print(f"kiln prepare: {output} is already complete (_SUCCESS); nothing to do. Use --overwrite to redo it.")
        stats["this_run"] = {"skipped": True}
        return stats
    remove_temp_files(output)
    footers = read_footers(output)
    stale = sorted({f["config_fingerprint"] for f in footers.values()} - {fingerprint})
    if stale:
        raise ConfigError(
            f"{output} holds shards made from other input files or settings "
            f"(fingerprints {stale}, this run {fingerprint}); use --overwrite or another --output"
        )
    done = frozenset(footers)
    if done and not quiet:
        print(f"kiln prepare: resuming {output}: {len(done)} shard(s) already complete are skipped")

    try:
        run_cfg, provenance, errors = resolve_models(cfg)  # what each loader opens (--models DIR, registry names, local:)
        models = describe_models(run_cfg, provenance, cfg, errors)  # every model loads (or is hashed) here, before any worker starts
    except BaseException:
        if made_output:  # a run refused before any work leaves no trace: the directory it made goes
            with contextlib.suppress(OSError):
                os.rmdir(output)  # only if still empty
        raise
    options = PipelineOptions(beam_argv)
    p = test_pipeline if test_pipeline is not None else beam.Pipeline(options=options)
    # Progress: local runs count rows with taps (the DirectRunner's run() blocks, so its metrics
    # cannot be polled); a runner whose run() returns at once (Dataflow) is polled for its counters.
    progress = LocalProgress.for_run(options, enabled=not quiet)
    build_pipeline(p, run_cfg, input_schema, done, fingerprint, progress_dir=progress.dir if progress else None, list_hashes=hashes)
    printer = progress.printer(input_rows).start() if progress else None
    try:
        with _beam_errors_reported_once():
            result = p.run()
            if printer is None and not quiet:
                printer = ProgressPrinter(result, input_rows, interval_s=30).start()
            result.wait_until_finish()
    except BaseException as err:
        remove_temp_files(output)  # an interrupted or failed run leaves no partial file
        _raise_as_user_error(err, output)
        raise
    finally:
        if printer is not None:
            printer.stop()
        if progress is not None:
            progress.close()
    counters = _counters(result)

    footers = read_footers(output)
    stage_modes = cfg.stage_modes()
    stats = {
        "kiln_version": __version__,
        "git_commit": _git_commit(),
        "config_fingerprint": fingerprint,
        "started_at": started.isoformat(),
        "input": {"pattern": cfg.input.input, "files": input_files, "rows": input_rows},
        "flags": flat(cfg),
        "command": command_line(cfg, beam_argv),
        "stage_modes": stage_modes,
        "models": models,
        "consent": consent_stats(cfg, counters, blocklists, optout_lists),
        "beam_options": options.get_all_options(drop_default=True),
        "versions": _versions(),
        "this_run": {
            "shards_skipped": len(done),
            "shards_written": counters.get("write/shards"),
            "counters": counters,
            "stage_busy_s": {k.split("/")[0]: v / 1000 for k, v in counters.items() if k.endswith("/busy_ms")},
            "download_hosts": top_hosts(counters),  # the hosts with the most URLs: urls, ok, 429/503s
        },
    }
    try:
        accounting = check_accounting(output, input_rows, footers, counters if not done else {"read/rows": counters.get("read/rows")})
    except AccountingError as err:
        stats["accounting"] = err.result
        stats["finished_at"] = dt.datetime.now(dt.timezone.utc).isoformat()
        write_json(f"{output}/stats.json", stats)
        raise
    funnel = funnel_from(input_rows, footers, stage_modes)
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
    if cfg.output.card:
        from pipeline.card import write_card

        write_card(output)  # re-checks the files against stats.json; CardError fails the run
    with FileSystems.create(f"{output}/_SUCCESS") as f:
        f.write(b"")
    if not quiet:
        print_funnel(stats, output, card=cfg.output.card)
    return stats


def print_funnel(stats: dict, output: str, card: bool = False) -> None:
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
    if card:
        print(f"  card:    {output}/README.md   croissant: {output}/croissant.json   "
              f"EU training summary: {output}/training_summary.md")


def main(cfg: PrepareConfig, beam_argv: list[str]) -> int:
    """`kiln prepare`. A bad input or output raises ConfigError (exit 2), a failed run AccountingError
    or CardError (exit 1): pipeline.cli turns each into one line."""
    run(cfg, beam_argv)
    return 0
