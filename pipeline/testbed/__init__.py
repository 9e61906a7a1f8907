"""kiln's testbed: what tests, benchmarks and `kiln demo` run the job against, never the job itself.

  synth.py           a synthetic web: LAION-format metadata, procedural images whose captions
                     describe them, planted failures, and the ground truth of each row
  toxic_captions.py  the toxic / clean phrase sets the synthetic web and the tiny Detoxify share
  models/            tiny models built locally in the real on-disk formats (CLIP, NSFW head,
                     Detoxify, T5), cached by `cached_test_models()`
  demo.py            `kiln demo`: the main job on this embedded default, end to end
"""

from __future__ import annotations




def prepare_config(input_glob: str, output: str, allow_hosts: str, *flags: str):
    """A `kiln prepare` config exactly as the CLI would build it from these flags, for tests,
    benchmarks and the demo (only the given server is allowed). Beam flags are refused here."""
    from pipeline.config import parse_prepare

    cfg, beam_argv = parse_prepare(["--input", input_glob, "--output", output, "--allow-hosts", allow_hosts, *flags])
    if beam_argv:
        raise ValueError(f"not kiln prepare flags: {beam_argv}")
    return cfg
