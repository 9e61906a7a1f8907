"""`kiln embed-prompts`: encode sampling prompts with the same T5 and cleaning as the training captions.

    kiln embed-prompts PROMPTS.txt -o prompts.parquet [--t5-model SPEC] [--t5-max-length 128]

The sampler (train/) never loads T5, so prompts are embedded here, once, exactly as `kiln prepare`
embeds captions: `embed.text.clean_caption`, then `embed.t5.T5Embedder` (same model spec, same
max_length -- sampling with a different encoder or cleaning than training is a silent quality bug).

Input: a UTF-8 text file, one prompt per line; lines that are empty or only whitespace are skipped
(a BOM and CRLF line ends are accepted). No prompts at all is an error.

Output: one Parquet file (zstd), one row per prompt in file order:

| column | type | meaning |
| --- | --- | --- |
| `prompt` | string | the line as written (without its line end) |
| `prompt_clean` | string | `clean_caption(prompt)`: the text T5 encoded |
| `t5_len` | int32 | tokens encoded, EOS included, at most `max_length` |
| `t5_truncated` | bool | the cleaned prompt had more than `max_length` tokens (its tail was cut, EOS kept) |
| `t5` | binary | float16 little-endian `[t5_len, d_model]`, row-major: `np.frombuffer(b, "<f2").reshape(t5_len, d_model)` |

The footer's key-value metadata holds `kiln.t5`, a JSON object: `model` (the spec), `sha256` (of the
weights, as in `embed.t5`), `d_model`, `max_length`, `dtype` ("float16"). The file is written under a
temporary name next to the target and renamed into place, so a reader never sees half a file.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.compat import ensure_torch_compat
from pipeline.errors import UserError, one_line

PROMPTS_SCHEMA = pa.schema(
    [
        ("prompt", pa.string()),
        ("prompt_clean", pa.string()),
        ("t5_len", pa.int32()),
        ("t5_truncated", pa.bool_()),
        ("t5", pa.binary()),
    ]
)
FOOTER_KEY = b"kiln.t5"
# = embed.t5.DEFAULT_MODEL, repeated rather than imported: the CLI builds its parser (and so runs
# add_embed_prompts_args) for `kiln --help`, which must not import torch. A test keeps them equal.
DEFAULT_T5_MODEL = "google/t5-v1_1-xxl"


def read_prompts(path: str | os.PathLike) -> list[str]:
    """The prompts in `path`: one per line, blank lines skipped. A UserError (one line, exit 2) if
    the file is missing, not UTF-8 or holds no prompts."""
    path = Path(path)
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise PromptsFileError(f"prompts file {path} {what}: give a UTF-8 text file, one prompt per line")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise PromptsFileError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start}): "
                               "save it as UTF-8, one prompt per line") from err
    prompts = [line.rstrip("\r") for line in text.split("\n") if line.strip()]
    if not prompts:
        raise PromptsFileError(f"{path} holds no prompts: expected one prompt per non-empty line")
    return prompts


class PromptsFileError(UserError, ValueError):
    """A prompts file or output path `kiln embed-prompts` cannot use."""


def check_output(out: str | os.PathLike) -> Path:
    """-o must name a file: not a directory, not under a file (checked before T5 loads)."""
    out = Path(out)
    if out.is_dir():
        raise PromptsFileError(f"-o {out} is a directory: give a file name, e.g. {out / 'prompts.parquet'}")
    parent = next((p for p in out.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise PromptsFileError(f"-o {out}: {parent} is a file, not a directory; give a path in a directory")
    return out


def prompts_table(prompts: list[str], results, source: dict) -> pa.Table:
    """The output table (module docstring) for `prompts` and their `embed.t5.EmbedResult`s."""
    columns = {
        "prompt": prompts,
        "prompt_clean": [r.text for r in results],
        "t5_len": [r.n_tokens for r in results],
        "t5_truncated": [r.truncated for r in results],
        "t5": [np.ascontiguousarray(r.array, dtype="<f2").tobytes() for r in results],
    }
    meta = {
        "model": source["spec"],
        "sha256": source["sha256"],
        "d_model": source["d_model"],
        "max_length": source["max_length"],
        "dtype": "float16",
    }
    table = pa.Table.from_pydict(columns, schema=PROMPTS_SCHEMA)
    return table.replace_schema_metadata({FOOTER_KEY: json.dumps(meta, sort_keys=True).encode()})


def write_atomic(table: pa.Table, out: str | os.PathLike) -> Path:
    """Write `table` to a temporary name beside `out`, then rename it over `out`."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:12]}")
    try:
        pq.write_table(table, tmp, compression="zstd")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def embed_prompts(prompts_path: str | os.PathLike, out: str | os.PathLike, t5_model: str = DEFAULT_T5_MODEL, *,
                  max_length: int = 128, device: str | None = None, embedder=None, models_dir: str | None = None) -> dict:
    """Read the prompts, encode them with the T5 that `t5_model` names (as `kiln prepare`'s
    --t5-model, through the same resolver: a hub id[@REV] in the local HF cache, a registry name from
    `models_dir`, or local:DIR) or with a ready `embedder`, write the Parquet file; returns a summary
    (prompts, truncated, d_model, out). What `kiln embed-prompts` runs."""
    prompts = read_prompts(prompts_path)  # a bad file fails before a multi-GB encoder loads
    check_output(out)
    if embedder is None:
        ensure_torch_compat()
        # Imported here, not at the top: the CLI imports this module to build `kiln --help`, which
        # must not import torch and transformers.
        from embed.t5 import T5Embedder
        from pipeline.models.resolve import resolve

        embedder = T5Embedder(resolve("t5", t5_model, models_dir).loader_spec, device=device, max_length=max_length)
    results = embedder.embed(prompts)
    path = write_atomic(prompts_table(prompts, results, embedder.source), out)
    return {
        "prompts": len(prompts),
        "truncated": sum(r.truncated for r in results),
        "d_model": embedder.d_model,
        "out": str(path),
    }


def add_embed_prompts_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompts", metavar="PROMPTS.txt", help="UTF-8 text file, one prompt per line (blank lines skipped)")
    parser.add_argument("-o", "--output", required=True, metavar="OUT.parquet", help="output Parquet file (replaced atomically)")
    parser.add_argument("--t5-model", default=DEFAULT_T5_MODEL, metavar="SPEC",
                        help=f"the T5 that encoded the training captions, as kiln prepare's --t5-model: hub id[@REV] in "
                        f"the local HF cache, a registry name (with --models), or local:DIR [{DEFAULT_T5_MODEL}]")
    parser.add_argument("--models", default=None, metavar="DIR",
                        help="a folder written by `kiln models fetch`: --t5-model is taken from there [none]")
    parser.add_argument("--t5-max-length", type=int, default=128, metavar="N", help="tokens per prompt, EOS included [128]")
    parser.add_argument("--t5-device", default=None, metavar="DEVICE", help="cpu, cuda, cuda:1 ... [cuda if available, else cpu]")


def main_embed_prompts(args: argparse.Namespace) -> int:
    """`kiln embed-prompts`. A bad prompts file, output path or T5 spec raises a UserError: the kiln
    CLI prints it as one line and exits 2 (pipeline.errors)."""
    t0 = time.monotonic()
    if args.t5_max_length < 1:
        raise PromptsFileError(f"--t5-max-length must be >= 1, got {args.t5_max_length}")
    try:
        summary = embed_prompts(args.prompts, args.output, args.t5_model, max_length=args.t5_max_length,
                                device=args.t5_device, models_dir=args.models)
    except UserError:
        raise
    except (FileNotFoundError, ValueError) as err:  # the T5 spec: no such local dir, not in the HF cache, ...
        raise UserError(f"{one_line(err)}") from err
    print(
        f"wrote {summary['prompts']} prompts ({summary['truncated']} truncated to {args.t5_max_length} tokens), "
        f"d_model {summary['d_model']}, to {summary['out']} in {time.monotonic() - t0:.1f}s"
    )
    return 0
