"""The `kiln` command. Heavy modules are imported inside each command, so `kiln --help` is instant."""

from __future__ import annotations

import argparse
import errno
import os
import signal
import sys
import threading
from pathlib import Path

from pipeline.errors import Interrupted, UserError, one_line


def _prepare(args, extra):
    from pipeline.config import config_from_namespace

    cfg, beam_argv = config_from_namespace(args, extra)  # ConfigError: one line, before any work starts
    from pipeline.prepare import main

    return main(cfg, beam_argv)


def _synth(args, extra):
    from pipeline.errors import UserError
    from pipeline.testbed.synth import SynthArgumentError, main_synth

    out = Path(args.out)
    if out.exists() and not out.is_dir() or any(p.exists() and not p.is_dir() for p in out.parents):
        raise UserError(f"--out {args.out}: a file is in the way (it or a folder above it is a regular file); choose a directory")
    try:
        return main_synth(args)
    except SynthArgumentError as err:  # synthesize's own checks of its arguments (rows, rates, formats, size range)
        raise UserError(f"{err}; see `kiln synth --help`") from err


def _serve(args, extra):
    from pipeline.testbed.server import main_serve

    return main_serve(args)


def _make_test_models(args, extra):
    from pipeline.testbed.models import main

    return main(args)


def _embed_prompts(args, extra):
    from pipeline.embed_prompts import main_embed_prompts

    return main_embed_prompts(args)


def _train(args, extra):
    from train.cli import main_train

    return main_train(args)


def _sample(args, extra):
    from train.cli import main_sample

    return main_sample(args)


def _eval(args, extra):
    from pipeline.evaluation import main_eval

    return main_eval(args)


def _rate(args, extra):
    from train.rate import main_rate

    return main_rate(args)


def _card(args, extra):
    from pipeline.card import main_card

    return main_card(args)


def _models(args, extra):
    from pipeline.models.cli import main_models

    return main_models(args)


def _demo(args, extra):
    from pipeline.testbed.demo import main

    return main(args, extra)


class OneLineParser(argparse.ArgumentParser):
    """argparse, with a usage mistake said in one line (what, and where the help is), exit 2."""

    def error(self, message: str):  # noqa: D102 - argparse's hook
        self.exit(2, f"{self.prog}: error: {message} (`{self.prog} --help` lists the flags)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="kiln",
        description="Prepare Imagen-style text-to-image training data with Apache Beam, and train on it.",
    )
    parser.add_argument("--version", action="version", version=f"kiln {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    from pipeline.embed_prompts import add_embed_prompts_args
    from pipeline.config import add_arguments as add_prepare_args
    from pipeline.testbed.server import add_serve_args
    from pipeline.testbed.synth import add_synth_args

    p = sub.add_parser(
        "prepare",
        usage="kiln prepare --input GLOB --output DIR [flags] [Beam flags]",
        help="metadata parquet -> filtered, accounted webdataset + Parquet shards (a Beam job)",
        description="Run the Beam job. Unknown flags go to Beam, e.g. --runner DirectRunner "
        "--direct_running_mode multi_processing --direct_num_workers 2, or Dataflow's flags.",
    )
    add_prepare_args(p)
    p.set_defaults(func=_prepare, beam_args=True)

    s = sub.add_parser("synth", help="write a synthetic web: LAION-format metadata, images, planted failures, ground truth")
    add_synth_args(s)
    s.set_defaults(func=_synth)

    v = sub.add_parser("serve", help="serve a synthetic web on 127.0.0.1 until interrupted")
    add_serve_args(v)
    v.set_defaults(func=_serve)

    m = sub.add_parser(
        "make-test-models",
        help="build the tiny local models (CLIP, NSFW head, Detoxify) that tests and the demo use",
        description="Train/initialise tiny models in the real on-disk formats (open_clip local-dir, "
        "safetensors NSFW head, Detoxify checkpoint). Takes a few minutes on 2 CPU cores; downloads nothing.",
    )
    m.add_argument("dir", help="output directory")
    m.add_argument("--seed", type=int, default=0, help="seed of every builder [0]")
    m.set_defaults(func=_make_test_models)

    e = sub.add_parser("embed-prompts", help="encode sampling prompts with the same frozen T5 and cleaning -> parquet")
    add_embed_prompts_args(e)
    e.set_defaults(func=_embed_prompts)

    c = sub.add_parser("card", help="write the dataset card (README.md + plots), croissant.json and the EU training-content summary for a prepared dataset")
    from pipeline.card import add_card_args

    add_card_args(c)
    c.set_defaults(func=_card)

    from pipeline.subset import add_subset_args, main_subset  # light: the Beam job is pipeline.subset_job, imported on run

    su = sub.add_parser("subset", usage="kiln subset PARENT --out CHILD [rules] [Beam flags]",
                        help="a finished dataset -> a child dataset by rules on stored columns, licences, uid lists, "
                        "blocklists and dedup; offline, accounted against the parent (docs/subset.md)")
    add_subset_args(su)
    su.set_defaults(func=main_subset, beam_args=True)

    from train.cli import add_sample_args, add_train_args

    t = sub.add_parser("train", help="train one cascade stage (base64 / sr256 / sr1024 / tiny-*) from the shards")
    add_train_args(t)
    t.set_defaults(func=_train)
    sm = sub.add_parser("sample", help="sample the cascade (base -> sr256 -> sr1024, each optional) into a grid PNG")
    add_sample_args(sm)
    sm.set_defaults(func=_sample)
    from train.cli import add_eval_args

    ev = sub.add_parser("eval", help="score samples: the synthetic compositional suite, CLIP score, FID/KID, a "
                        "guidance sweep -> eval.json, plots, report.html (docs/eval.md)")
    add_eval_args(ev)
    ev.set_defaults(func=_eval)

    from train.rate import add_rate_args  # standard library only; pyarrow when the command runs

    ra = sub.add_parser("rate", help="side-by-side human rating of two `kiln sample --out-dir` directories "
                        "(a page on 127.0.0.1); --summary tallies the answers")
    add_rate_args(ra)
    ra.set_defaults(func=_rate)

    from pipeline.recheck import add_recheck_args, main_recheck  # no Beam until the command runs

    rc = sub.add_parser("recheck", usage="kiln recheck PARENT --out FILE [flags] [Beam flags]",
                        help="ask each kept sample's host again for its opt-outs (robots.txt, tdmrep.json, X-Robots-Tag) "
                        "-> the uids that now opt out, for `kiln subset --drop-uids` (a Beam job)",
                        description="Re-fetch robots.txt and tdmrep.json once per origin and HEAD every kept URL through "
                        "the safe fetcher, politely; write the uids whose owners now opt out (FILE) and a report (FILE.json). "
                        "Unknown flags go to Beam. docs/consent.md, \"Rechecking a finished dataset\".")
    add_recheck_args(rc)
    rc.set_defaults(func=lambda args, extra: main_recheck(args, extra), beam_args=True)

    mo = sub.add_parser("models", help="the model registry: list, show, fetch (checked, resumable) and verify model folders")
    from pipeline.models.cli import add_models_args

    add_models_args(mo)
    mo.set_defaults(func=_models)

    d = sub.add_parser("demo", help="synthesise a small web, serve it, run `kiln prepare` on it and print the funnel")
    d.add_argument("--workdir", default="build/demo", help="where the web and the dataset go [build/demo]")
    d.add_argument("--rows", type=int, default=500, help="rows of the synthetic web [500]")
    d.add_argument("--seed", type=int, default=0, help="seed of the synthetic web [0]")
    d.add_argument("--train-s", type=float, default=240.0, help="seconds of tiny-cascade training after prepare; 0 skips [240]")
    d.add_argument("--t5-encoder", choices=("random", "pretrained"), default="random",
                   help="the tiny T5 that embeds captions: the random-init test model, or the one pretrained on text "
                   "only (span corruption + scene parsing; built once into the cache, ~5 CPU minutes; the cascade "
                   "then follows background colours: docs/eval.md) [random]")
    d.set_defaults(func=_demo, beam_args=True)
    return parser


def _version() -> str:
    from pipeline import __version__

    return __version__


def _debug(argv: list[str]) -> tuple[bool, list[str]]:
    """`--debug` anywhere on the line (or KILN_DEBUG=1): show tracebacks of user errors too."""
    debug = os.environ.get("KILN_DEBUG", "").strip().lower() not in ("", "0", "false", "no")
    return debug or "--debug" in argv, [a for a in argv if a != "--debug"]


# OSErrors that are the machine's state, not kiln's bug: said in one line (exit 1), like a UserError.
ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.EMFILE}


def _on_sigterm(signum, frame):
    raise Interrupted("terminated (SIGTERM)")


def main(argv: list[str] | None = None) -> int:
    """Run one `kiln` command under the error rule (pipeline.errors): a user's mistake is one line on
    stderr and exit 2 (usage) or 1 (failed run); Ctrl-C / SIGTERM one line and 130 / 143; a bug in
    kiln keeps its traceback."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug, argv = _debug(argv)
    if debug:
        os.environ["KILN_DEBUG"] = "1"  # what the job's error reporting reads (pipeline.prepare)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "beam_args", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    name = f"kiln {args.command}"
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    from train.errors import UserError as TrainUserError  # standard library only

    try:
        return int(args.func(args, extra) or 0)
    except (UserError, TrainUserError) as err:
        if debug:
            raise
        print(f"{name}: error: {one_line(err)}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt as err:
        if debug:
            raise
        what = "terminated" if isinstance(err, Interrupted) else "interrupted"
        print(f"\n{name}: {what}; nothing partial was left as a finished file -- re-run the same command to resume",
              file=sys.stderr)
        return getattr(err, "exit_code", 130)
    except OSError as err:
        if debug or err.errno not in ENVIRONMENT_ERRNOS:
            raise
        where = f": {err.filename}" if err.filename else ""
        print(f"{name}: error: {err.strerror or one_line(err)}{where} -- fix that and re-run the same command "
              f"(finished shards are kept and skipped)", file=sys.stderr)
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
