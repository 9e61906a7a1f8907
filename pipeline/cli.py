"""The `kiln` command. Heavy modules are imported inside each command, so `kiln --help` is instant."""

from __future__ import annotations

import argparse
import sys


def _prepare(args, extra):
    from pipeline.beam_yaml import OptionsFileError
    from pipeline.config import ConfigError, config_from_namespace

    try:
        cfg, beam_argv = config_from_namespace(args, extra)
    except (ConfigError, OptionsFileError) as err:
        print(f"kiln prepare: error: {err}", file=sys.stderr)  # one line, before any work starts
        return 2
    from pipeline.prepare import main

    return main(cfg, beam_argv)


def _synth(args, extra):
    from pipeline.testbed.synth import main_synth

    return main_synth(args)


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


def _card(args, extra):
    from pipeline.card import main_card

    return main_card(args)


def _demo(args, extra):
    from pipeline.testbed.demo import main

    return main(args, extra)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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

    c = sub.add_parser("card", help="write the dataset card (README.md + plots) for a prepared dataset")
    from pipeline.card import add_card_args

    add_card_args(c)
    c.set_defaults(func=_card)

    from train.cli import add_sample_args, add_train_args

    t = sub.add_parser("train", help="train one cascade stage (base64 / sr256 / sr1024 / tiny-*) from the shards")
    add_train_args(t)
    t.set_defaults(func=_train)
    sm = sub.add_parser("sample", help="sample the cascade (base -> sr256 -> sr1024, each optional) into a grid PNG")
    add_sample_args(sm)
    sm.set_defaults(func=_sample)

    d = sub.add_parser("demo", help="synthesise a small web, serve it, run `kiln prepare` on it and print the funnel")
    d.add_argument("--workdir", default="build/demo", help="where the web and the dataset go [build/demo]")
    d.add_argument("--rows", type=int, default=500, help="rows of the synthetic web [500]")
    d.add_argument("--seed", type=int, default=0, help="seed of the synthetic web [0]")
    d.add_argument("--train-s", type=float, default=240.0, help="seconds of tiny-cascade training after prepare; 0 skips [240]")
    d.set_defaults(func=_demo, beam_args=True)
    return parser


def _version() -> str:
    from pipeline import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "beam_args", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return int(args.func(args, extra) or 0)


if __name__ == "__main__":
    sys.exit(main())
