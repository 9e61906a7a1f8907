"""`kiln demo`: the main job on an embedded default, end to end on this machine.

Builds (once, cached) the tiny local models, synthesises a small web (pipeline.synth) with planted
failures, mismatched and toxic captions, serves it on 127.0.0.1, runs `kiln prepare` on its
metadata with only that server allowed and every model filter on, and prints the funnel and where
everything went.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from pipeline.options import add_prepare_args


def prepare_args(input_glob: str, output: str, allow_hosts: str, *extra: str) -> argparse.Namespace:
    """`kiln prepare` flags as the CLI would parse them (used by the demo, tests and benchmarks)."""
    p = argparse.ArgumentParser()
    add_prepare_args(p)
    return p.parse_args(["--input", input_glob, "--output", output, "--allow-hosts", allow_hosts, *extra])


def main(args: argparse.Namespace, beam_argv: list[str]) -> int:
    from pipeline.prepare import run
    from pipeline.synth import SynthServer, synthesize
    from pipeline.testmodels import cached_test_models, prepare_flags

    print("kiln demo: tiny local models (built once into .kiln-cache/, a few minutes the first time)")
    models = cached_test_models()

    work = Path(args.workdir)
    web_dir, out_dir = work / "web", work / "dataset"
    if web_dir.exists():
        shutil.rmtree(web_dir)
    print(f"kiln demo: synthesising {args.rows} rows (seed {args.seed}) into {web_dir}")
    web = synthesize(web_dir, rows=args.rows, seed=args.seed, failure_rate=0.2, mismatch_rate=0.1, toxic_rate=0.04)
    with SynthServer(web) as server:
        print(f"kiln demo: serving the synthetic web at {server.base_url}; allowing only {server.allow_hosts}")
        # A short deadline keeps the planted slow-drip and stalled URLs from dominating the demo.
        pargs = prepare_args(str(web_dir / "metadata.parquet"), str(out_dir), server.allow_hosts,
                             "--overwrite", "--download-timeout", "4", "--samples-per-shard", "200",
                             *prepare_flags(models))
        run(pargs, beam_argv)
    print(f"\nkiln demo: done. Read a shard with: tar tvf {out_dir}/shards/000000.tar | head")
    return 0
