"""A tiny T5 v1.1-style text encoder with a locally trained SentencePiece vocabulary, built in seconds.

`build_tiny_t5(out_dir, seed)` writes a folder that `embed.t5.T5Embedder` (and `kiln prepare
--t5-model local:OUT_DIR`, `kiln embed-prompts --t5-model local:OUT_DIR`) loads with the real
transformers loaders and no network:

    spiece.model            a SentencePiece unigram model trained here, with T5's special ids
                            (<pad>=0, </s>=1, <unk>=2, no BOS) and T5's default nmt_nfkc normaliser
    tokenizer.json,         written by transformers' own `T5Tokenizer.save_pretrained` after loading
    tokenizer_config.json   spiece.model with `from_pretrained(dir)` (docs/PITFALLS.md: constructing
                            `T5Tokenizer(vocab_file=...)` silently ignores the file)
    config.json,            a `T5EncoderModel` shaped like T5 v1.1 but tiny (d_model 64, 2 layers,
    model.safetensors       4 heads x d_kv 16, gated-GELU d_ff 128, 32 relative-position buckets),
                            seeded random init -- NOT a trained language model
    model_card.json         what it is and the checks it passed

Training text: the synthetic web's captions (`pipeline.testbed.synth`, no failures) plus seeded prompt-like
sentences over a few hundred words (so the vocabulary reaches ~1000 pieces and covers words a test
or a prompt file uses), all passed through `embed.text.clean_caption` first, as the encoder's input
always is. The builder then checks that the tokenizer transformers loads from the folder gives the
raw SentencePiece model's ids, plus EOS, on every training sentence and a set of probes, and raises
otherwise.

Deterministic for a seed: the same bytes in every file (`reproducible`; build.py). ~2 s on one core.

    .venv/bin/python -m pipeline.testbed.models.t5 OUT_DIR [--seed 0]
"""

from __future__ import annotations

import argparse
import io
import json
import random
import shutil
import tempfile
from pathlib import Path

from pipeline.compat import ensure_torch_compat
from pipeline.testbed.models.determinism import SYNTH_BASE_URL, reproducible

# Bump when the builder's output would change (corpus, vocabulary, config, init).
TINY_T5_VERSION = 1

VOCAB_SIZE = 1024  # requested; SentencePiece may stop a little short (hard_vocab_limit=False)
PAD_ID, EOS_ID, UNK_ID = 0, 1, 2  # T5's special ids (google/t5-v1_1-*'s spiece.model)
TINY_T5_CONFIG = {
    "d_model": 64,
    "d_kv": 16,
    "num_heads": 4,
    "d_ff": 128,
    "num_layers": 2,
    "feed_forward_proj": "gated-gelu",  # T5 v1.1: GEGLU feed-forward (v1.0 used ReLU)
    "relative_attention_num_buckets": 32,  # as in T5 v1.1
    "relative_attention_max_distance": 128,
    "dropout_rate": 0.0,
    "layer_norm_epsilon": 1e-6,
}
_SYNTH_ROWS = 1500
_PROMPTS = 3000
_NAMES = 1500  # invented proper names: enough distinct words for SentencePiece to reach VOCAB_SIZE

# Word banks for the prompt-like half of the corpus.
_SUBJECTS = """astronaut robot corgi kitten tiger elephant giraffe penguin octopus dragon unicorn wizard
knight samurai pirate ballerina chef farmer scientist painter musician violinist child grandmother
teapot bicycle motorcycle sailboat lighthouse castle cathedral skyscraper bridge windmill greenhouse
mountain waterfall volcano glacier forest meadow desert canyon island river harbor village city
garden library kitchen bakery market subway train airplane balloon rocket spaceship submarine
sunflower orchid cactus mushroom strawberry pineapple avocado croissant pizza hamburger sushi
teacup lantern umbrella typewriter telescope guitar piano violin camera clock compass map crown
owl fox wolf bear rabbit deer horse zebra panda koala parrot flamingo hummingbird butterfly whale
dolphin jellyfish turtle frog snail bee ladybug""".split()  # noqa: SIM905 - a word bank reads better as prose
_ADJECTIVES = """ancient futuristic tiny enormous fluffy shiny rusty golden silver wooden glass crystal
paper origami neon glowing misty foggy rainy snowy sunny stormy cozy lonely cheerful mysterious
elegant whimsical surreal vintage retro modern minimalist ornate colorful pastel vibrant muted dark
bright translucent melting floating sleeping dancing laughing ancient-looking weathered abandoned
bustling quiet peaceful majestic delicate massive miniature geometric abstract realistic""".split()  # noqa: SIM905
_PLACES = """in a forest, on the moon, under the sea, in a library, on a rooftop, in the desert, at the
beach, in a snowy village, on a mountain top, in a busy market, inside a cathedral, in outer space,
by a river, in a rainy street, on a wooden table, in a sunlit kitchen, at night, at sunset, at dawn,
in the clouds, on mars, in tokyo, in paris, in new york, in a greenhouse, in a museum, on a train,
in a field of flowers, next to a lake, behind a waterfall"""
_PLACES = " ".join(_PLACES.split()).split(", ")
_STYLES = """oil painting, watercolor, pencil sketch, charcoal drawing, digital art, 3d render, studio
photo, polaroid photo, film photograph, 35mm photo, macro photo, aerial photo, pixel art, vector art,
anime style, comic book style, concept art, matte painting, stained glass, mosaic, embroidery,
claymation, low poly, isometric, ukiyo-e woodblock print, art nouveau poster, cinematic lighting,
golden hour, volumetric light, high detail, 4k, 8k, trending on artstation, bokeh, wide angle,
long exposure, black and white, sepia tone"""
_STYLES = " ".join(_STYLES.split()).split(", ")
_VERBS = """riding, reading, holding, eating, painting, playing with, watching, chasing, carrying,
building, flying over, walking through, sitting on, standing next to, looking at, sleeping under,
jumping over, hiding behind, dancing with"""
_VERBS = " ".join(_VERBS.split()).split(", ")
_EXTRAS = [
    "A café in Zürich, naïve art",  # accents reach the vocabulary as characters
    "señor García's piñata, 1998",
    "rock & roll poster (limited edition) #42",
    "\"hello world\" written on a chalkboard: 100% handmade!",
    "the quick brown fox jumps over the lazy dog",
    "numbers 0 1 2 3 4 5 6 7 8 9 and 2024-05-17, 3.5 kg, $20, 50%",
]
_PROBES = [
    "a red circle on a blue background",
    "An astronaut riding a horse on the moon, oil painting",
    "A café in Zürich",
    "unseenword xyzzy qwertyuiop",  # pieces or <unk>, never an error
    "",  # only EOS
]


def _log(msg: str) -> None:
    print(f"[tiny-t5] {msg}", flush=True)


def _synthetic_captions(seed: int, rows: int) -> list[str]:
    """The synthetic web's captions (tiny PNGs: only the text is used)."""
    import pyarrow.parquet as pq

    from pipeline.testbed.synth import synthesize

    with tempfile.TemporaryDirectory(prefix="kiln-t5-synth-") as tmp:
        web = synthesize(tmp, rows=rows, seed=seed, failure_rate=0.0, size_range=(16, 24), formats=("png",), min_size=8,
                         base_url=SYNTH_BASE_URL)
        return [t for t in pq.read_table(web.ground_truth_path, columns=["TEXT"]).column("TEXT").to_pylist() if t]


def _invented_names(rng: random.Random, n: int) -> list[str]:
    """Pronounceable made-up names ("Velorin", "Tasku"): web captions are full of names and brands."""
    onsets = "b c d f g h j k l m n p r s t v w z br ch dr gr kr pl sh st th tr".split()  # noqa: SIM905
    vowels = "a e i o u ai ea ou y".split()  # noqa: SIM905
    codas = ["", "", "n", "r", "s", "l", "m", "x", "nd", "rk", "st"]
    return [
        "".join(rng.choice(onsets) + rng.choice(vowels) + rng.choice(codas) for _ in range(rng.randint(2, 3))).capitalize()
        for _ in range(n)
    ]


def prompt_like_text(rng: random.Random, n: int) -> list[str]:
    """`n` seeded prompt-like sentences ("a misty lighthouse at dawn, watercolor", "Velorin poster")."""
    names = _invented_names(rng, _NAMES)
    out = []
    for _ in range(n):
        subject = f"{rng.choice(_ADJECTIVES)} {rng.choice(_SUBJECTS)}"
        form = rng.randrange(5)
        if form == 0:
            text = f"a {subject} {rng.choice(_PLACES)}"
        elif form == 1:
            text = f"a {subject} {rng.choice(_VERBS)} a {rng.choice(_SUBJECTS)} {rng.choice(_PLACES)}"
        elif form == 2:
            text = f"{rng.choice(_STYLES)} of a {subject}"
        elif form == 3:
            text = f"the {subject}"
        else:
            text = f"{rng.choice(names)} {rng.choice(_SUBJECTS)} by {rng.choice(names)} {rng.choice(names)}"
        styles = rng.sample(_STYLES, rng.randrange(3))
        text = ", ".join([text, *styles])
        out.append(text[0].upper() + text[1:] if rng.random() < 0.3 else text)
    return out


def training_corpus(seed: int = 0) -> list[str]:
    """Cleaned sentences the SentencePiece model is trained on (deterministic per seed)."""
    from embed.text import clean_caption

    rng = random.Random(f"kiln-tiny-t5-{seed}")
    texts = _synthetic_captions(seed, _SYNTH_ROWS) + prompt_like_text(rng, _PROMPTS) + _EXTRAS * 5
    return [c for c in (clean_caption(t) for t in texts) if c]


def _train_sentencepiece(corpus: list[str], seed: int) -> bytes:
    import sentencepiece as spm

    spm.set_random_generator_seed(seed)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus),
        model_writer=model,
        model_type="unigram",  # T5's spiece.model is a unigram model
        vocab_size=VOCAB_SIZE,
        hard_vocab_limit=False,
        pad_id=PAD_ID,
        eos_id=EOS_ID,
        unk_id=UNK_ID,
        bos_id=-1,
        character_coverage=1.0,
        num_threads=1,  # one thread: the same pieces and scores on every run
        minloglevel=2,
    )
    return model.getvalue()


def _check_tokenizer(out: Path, sp_model: bytes, texts: list[str]) -> dict:
    """The tokenizer transformers loads from `out` must give SentencePiece's ids + EOS on `texts`."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    sp = spm.SentencePieceProcessor(model_proto=sp_model)
    tok = AutoTokenizer.from_pretrained(str(out))
    if (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) != (PAD_ID, EOS_ID, UNK_ID):
        raise RuntimeError(f"tokenizer special ids {(tok.pad_token_id, tok.eos_token_id, tok.unk_token_id)} != T5's (0, 1, 2)")
    if len(tok) != sp.get_piece_size():
        raise RuntimeError(f"tokenizer has {len(tok)} tokens, spiece.model {sp.get_piece_size()}: the file was not used")
    got = tok(texts).input_ids
    for text, ids in zip(texts, got):
        want = sp.encode(text) + [EOS_ID]
        if ids != want:
            raise RuntimeError(f"tokenizer ids differ from SentencePiece's for {text!r}: {ids} != {want}")
    return {"checked_texts": len(texts), "probe": {"text": _PROBES[0], "ids": tok(_PROBES[0]).input_ids}}


@reproducible
def build_tiny_t5(out_dir: str | Path, seed: int = 0) -> Path:
    """Build the tiny T5 encoder folder into `out_dir` (replaced if it exists); returns its path."""
    ensure_torch_compat()
    import torch
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    from embed.t5 import quiet_hf_progress

    out = Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)

    corpus = training_corpus(seed)
    sp_model = _train_sentencepiece(corpus, seed)
    (out / "spiece.model").write_bytes(sp_model)
    # The real loading path: from_pretrained(dir) converts spiece.model; save_pretrained then writes
    # tokenizer.json so later loads need no conversion. extra_ids=0: no T5 sentinel tokens, so the
    # vocabulary is exactly the SentencePiece model's.
    tokenizer = T5Tokenizer.from_pretrained(str(out), extra_ids=0, model_max_length=512)
    tokenizer.save_pretrained(str(out))
    check = _check_tokenizer(out, sp_model, corpus + _PROBES)

    config = T5Config(
        vocab_size=len(tokenizer),
        pad_token_id=PAD_ID,
        eos_token_id=EOS_ID,
        decoder_start_token_id=PAD_ID,
        is_encoder_decoder=False,
        use_cache=False,
        **TINY_T5_CONFIG,
    )
    torch.manual_seed(seed)
    model = T5EncoderModel(config).eval()
    with quiet_hf_progress():  # no "Writing model shards" bar for a 0.5 MB file
        model.save_pretrained(str(out), safe_serialization=True)

    card = {
        "what": "tiny T5 v1.1-shaped encoder, seeded random init, local SentencePiece unigram vocabulary; for tests only",
        "builder": "pipeline/testbed/models/t5.py",
        "version": TINY_T5_VERSION,
        "seed": seed,
        "vocab_size": len(tokenizer),
        "special_ids": {"pad": PAD_ID, "eos": EOS_ID, "unk": UNK_ID},
        "config": TINY_T5_CONFIG,
        "corpus_sentences": len(corpus),
        "tokenizer_check": check,
    }
    (out / "model_card.json").write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build the tiny local T5 encoder (spiece.model + safetensors).")
    parser.add_argument("dir", help="output directory (replaced)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = build_tiny_t5(args.dir, seed=args.seed)
    _log(f"wrote {out}: use --t5-model local:{out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
