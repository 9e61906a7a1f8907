"""kiln's testbed: what tests, benchmarks and `kiln demo` run the job against, never the job itself.

  synth.py           a synthetic web: LAION-format metadata, procedural images whose captions
                     describe them, planted failures, and the ground truth of each row
  toxic_captions.py  the toxic / clean phrase sets the synthetic web and the tiny Detoxify share
  models/            tiny models built locally in the real on-disk formats (CLIP, NSFW head,
                     Detoxify, T5), cached by `cached_test_models()`
  demo.py            `kiln demo`: the main job on this embedded default, end to end
"""
