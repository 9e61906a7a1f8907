"""Convert LAION's autokeras CLIP NSFW detectors (ViT-B/32, ViT-L/14) to a safetensors head for NsfwScorer.

    python -m filters.nsfw_keras IN OUT.safetensors [--force]

IN is `clip_autokeras_nsfw_b32.zip` / `clip_autokeras_binary_nsfw.zip` as published, or the folder they
unzip to. OUT is written atomically (a temporary name, then os.replace) and an existing OUT is kept
unless --force. Exit 0 on success, 2 with one line on stderr for a file that cannot be used.

What the published files are (read from the files themselves, github.com/LAION-AI/CLIP-based-NSFW-Detector
at commit d6bb8fe, `clip_autokeras_nsfw_b32.zip` 231,831 bytes and `clip_autokeras_binary_nsfw.zip`
1,094,585 bytes; README.md there and clip-retrieval's `load_safety_model` load them with
`tf.keras.models.load_model(dir, custom_objects=autokeras.CUSTOM_OBJECTS)`; rom1504/embedding-reader
`examples/inference_example.py` ran the L/14 one over LAION-5B's stored float16 embeddings;
`nsfw-clip.py` in the LAION repo trained them with `ak.StructuredDataClassifier(max_trials=5)`):

  * a zipped TensorFlow SavedModel written by Keras 2.8.0 (`keras_metadata.pb`, `saved_model.pb`,
    `variables/variables.index` + `variables/variables.data-00000-of-00001`, empty `assets/`); no h5.
  * a Keras Functional model `model`, input `input_1` float64 [None, d], d = 512 (B/32) or 768 (L/14):
      input_1 -> multi_category_encoding (autokeras MultiCategoryEncoding) -> normalization
      (Normalization, axis -1) -> Dense/ReLU stack -> Dense(1) -> classification_head_1 (Activation sigmoid)
    B/32: dense 512->32, re_lu, dense_1 32->32, re_lu_1, dropout (0.5), dense_2 32->1, sigmoid.
    L/14: dense 768->64, re_lu, dense_1 64->512, re_lu_1, dense_2 512->256, re_lu_2, dense_3 256->1, sigmoid.
    All Dense layers have activation "linear" (the ReLUs are separate layers) and use_bias.
  * checkpoint variables (TF "tensor bundle"): `layer_with_weights-1/{mean,variance,count}` (the
    Normalization; count = 242067 training rows), `layer_with_weights-K/{kernel,bias}` for the Dense
    layers (kernel [in, out]), each under `/.ATTRIBUTES/VARIABLE_VALUE`; plus metrics, the
    `_CHECKPOINTABLE_OBJECT_GRAPH`, and empty `encoding_layers/N/token_counts` tables.
  * NOT a plain "Normalization + Dense" model: autokeras typed some embedding columns as categorical
    (fewer than 5% distinct values in the float16 training embeddings) -- columns 92, 133, 312 of
    B/32 and 180, 316, 413, 440, 644 of L/14. For those, MultiCategoryEncoding formats the value as a
    string (`tf.strings.as_string`, i.e. printf "%f", 6 decimals) and looks it up in a StringLookup
    vocabulary (1 OOV index: unknown -> 0, the k-th token -> k); the Normalization then sees that
    index (its mean there is ~130..1190). Other columns pass through as float32 (NaN -> 0). The
    vocabularies (1,566 / 747 / 745 tokens in B/32) are not in the checkpoint: they are constants of
    the lookup tables' initializer functions in `saved_model.pb` (object graph: StringLookup node ->
    `lookup_table` -> `_initialize` -> concrete function's bound inputs -> SavedConstant -> a `Const`
    node of the graph: string keys and int64 values). If a `token_counts` table is not empty, Keras
    2.8's loader rebuilds the vocabulary from it (finalize_state: count descending, then token
    descending); that is followed too.
  * Keras 2.8 Normalization.call: `(x - mean) / maximum(sqrt(variance), epsilon())`, epsilon() = 1e-7
    (keras/layers/preprocessing/normalization.py and keras/backend_config.py in keras 2.8.0).

Why no TensorFlow: the SavedModel pieces this needs are small, documented binary formats -- the
tensor bundle's `variables.index` is a LevelDB-format table (blocks of prefix-compressed entries,
48-byte footer with magic 0xdb4775248b80fb57) of BundleEntryProto (dtype, shape, offset, size,
masked crc32c) into the raw little-endian `variables.data-*` file, and `keras_metadata.pb` /
`saved_model.pb` are protobufs read here by field number (SavedMetadata, SavedModel, MetaGraphDef,
SavedObjectGraph, GraphDef, TensorProto). Reading them in ~200 lines of standard library + numpy, with
every crc32c checked, keeps the converter out of TensorFlow's install (and its Python-version lag)
and needs no optional extra (no h5py either: there is no .h5); a file that is not this layout is
refused with one line. Checked once by hand, outside the test suite, against TensorFlow 2.15's
`tf.saved_model.load(dir).signatures["serving_default"]` (the traced graph, no autokeras) on both
published models: on the same float64 inputs, including rows whose categorical columns hit the
vocabularies, the converted heads' forward pass matches to 1e-6 (B/32 and L/14); without the
lookups it would be off by up to 0.43.

The converted file (layout "keras_dense", read by filters.nsfw.NsfwScorer): tensors `norm.mean`,
`norm.variance`, `dense.{i}.weight` ([out, in], torch convention), `dense.{i}.bias`, and for the
categorical columns `lookup.columns` (int64 [k]) with `lookup.{j}.keys` (float64: each "%f" token
parsed; every token is checked to print back to itself) and `lookup.{j}.values` (int64 indices);
metadata {"layout": "keras_dense", "activation": "sigmoid", "norm_epsilon": "1e-07",
"input_precision": "float16", ...}. input_precision float16: LAION's punsafe came from float16-stored
L2-normalised embeddings (and the vocabularies are float16 values), so the scorer rounds the
L2-normalised embedding to float16 before the model, as LAION's inputs were.

`write_keras_nsfw` writes a SavedModel folder/zip with the same files, variable names, object-graph
paths and layer structure (random weights) for tests; it holds only what this reader reads.
This module imports nothing from `pipeline/` or `train/`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import struct
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from filters.errors import ModelLoadError
from filters.nsfw import FLAG, KERAS_LAYOUT

__all__ = ["KerasNsfwFormatError", "convert", "main", "read_keras_nsfw", "read_tensor_bundle", "to_safetensors_dict",
           "write_keras_nsfw"]

_TODO = "pass LAION's clip_autokeras_nsfw_b32.zip or clip_autokeras_binary_nsfw.zip (or the folder it unzips to)"
_EPSILON = 1e-7  # keras.backend.epsilon() in Keras 2.8
_MAGIC = 0xDB4775248B80FB57
_DTYPES = {1: "<f4", 2: "<f8", 3: "<i4", 4: "u1", 5: "<i2", 6: "i1", 9: "<i8", 10: "?", 19: "<f2"}
_DT_STRING = 7


class KerasNsfwFormatError(ModelLoadError):
    """A file that is not LAION's autokeras NSFW SavedModel layout (one line; a ValueError)."""

    def __init__(self, spec: object, problem: str, todo: str = _TODO):
        super().__init__(FLAG, spec, problem, todo)


# ------------------------------------------------------------------ crc32c, varints, protobuf fields


def _crc_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC_TABLE = _crc_table()


def _crc32c(data: bytes, crc: int = 0) -> int:
    crc ^= 0xFFFFFFFF
    t = _CRC_TABLE
    for b in data:
        crc = t[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _mask(crc: int) -> int:
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if i >= len(buf) or shift > 63:
            raise ValueError("truncated varint")
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return result, i


def _put_varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _fields(buf: bytes) -> dict[int, list]:
    """{field number: [values]} of one protobuf message (varints as int, others as bytes)."""
    out: dict[int, list] = {}
    i = 0
    while i < len(buf):
        tag, i = _varint(buf, i)
        num, wire = tag >> 3, tag & 7
        if wire == 0:
            v, i = _varint(buf, i)
        elif wire == 2:
            n, i = _varint(buf, i)
            if i + n > len(buf):
                raise ValueError("truncated protobuf field")
            v, i = buf[i: i + n], i + n
        elif wire == 5:
            v, i = buf[i: i + 4], i + 4
        elif wire == 1:
            v, i = buf[i: i + 8], i + 8
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        out.setdefault(num, []).append(v)
    return out


def _one(f: dict, num: int, default=None):
    v = f.get(num)
    return v[-1] if v else default


def _packed_ints(values: list) -> list[int]:
    out = []
    for v in values:
        if isinstance(v, int):
            out.append(v)
        else:
            i = 0
            while i < len(v):
                x, i = _varint(v, i)
                out.append(x)
    return out


def _pb(*items: tuple[int, object]) -> bytes:
    """Encode (field, value) pairs: int -> varint, bytes/str -> length-delimited."""
    out = bytearray()
    for num, v in items:
        if isinstance(v, int):
            out += _put_varint(num << 3) + _put_varint(v & 0xFFFFFFFFFFFFFFFF)
        else:
            b = v.encode() if isinstance(v, str) else bytes(v)
            out += _put_varint(num << 3 | 2) + _put_varint(len(b)) + b
    return bytes(out)


# ------------------------------------------------------------------ tensor bundle (variables.index/data)


def _read_block(buf: bytes, offset: int, size: int) -> list[tuple[bytes, bytes]]:
    if offset + size + 5 > len(buf):
        raise ValueError("a table block runs past the end of the file")
    contents, trailer = buf[offset: offset + size], buf[offset + size: offset + size + 5]
    if trailer[0] != 0:
        raise ValueError(f"a compressed table block (type {trailer[0]}) is not supported")
    if _mask(_crc32c(contents + trailer[:1])) != struct.unpack("<I", trailer[1:])[0]:
        raise ValueError("a table block fails its crc32c check")
    (n_restarts,) = struct.unpack("<I", contents[-4:])
    end = len(contents) - 4 - 4 * n_restarts
    if end < 0:
        raise ValueError("a table block has a bad restart array")
    entries, key, i = [], b"", 0
    while i < end:
        shared, i = _varint(contents, i)
        unshared, i = _varint(contents, i)
        vlen, i = _varint(contents, i)
        key = key[:shared] + contents[i: i + unshared]
        i += unshared
        entries.append((key, contents[i: i + vlen]))
        i += vlen
    return entries


def _read_table(path: Path) -> dict[bytes, bytes]:
    buf = path.read_bytes()
    if len(buf) < 48 or struct.unpack("<Q", buf[-8:])[0] != _MAGIC:
        raise ValueError("not a TensorFlow table (no table magic number at its end)")
    footer, i = buf[-48:], 0
    _, i = _varint(footer, i)  # metaindex handle (unused)
    _, i = _varint(footer, i)
    index_off, i = _varint(footer, i)
    index_size, i = _varint(footer, i)
    table = {}
    for _, handle in _read_block(buf, index_off, index_size):
        off, j = _varint(handle, 0)
        size, _ = _varint(handle, j)
        table.update(_read_block(buf, off, size))
    return table


def read_tensor_bundle(prefix: str | os.PathLike) -> dict[str, np.ndarray]:
    """{checkpoint key: array} of a TF tensor bundle `prefix`.index + `prefix`.data-*; crc32c checked.

    String tensors come back as object arrays of bytes. ValueError for anything malformed."""
    prefix = str(prefix)
    table = _read_table(Path(prefix + ".index"))
    header = _fields(table.pop(b"", b""))
    num_shards = _one(header, 1, 1)
    if _one(header, 2, 0) != 0:
        raise ValueError("a big-endian tensor bundle is not supported")
    shards = [Path(f"{prefix}.data-{s:05d}-of-{num_shards:05d}").read_bytes() for s in range(num_shards)]
    out = {}
    for key, value in table.items():
        e = _fields(value)
        dtype, shard, offset, size = _one(e, 1, 0), _one(e, 3, 0), _one(e, 4, 0), _one(e, 5, 0)
        if e.get(7):
            raise ValueError(f"{key.decode(errors='replace')}: sliced tensors are not supported")
        shape = [(_one(_fields(d), 1, 0)) for d in _fields(_one(e, 2, b"")).get(2, [])]
        data = shards[shard][offset: offset + size]
        if len(data) != size:
            raise ValueError(f"{key.decode(errors='replace')}: data runs past the end of the data file")
        want = struct.unpack("<I", _one(e, 6, b"\0\0\0\0"))[0]
        n = int(np.prod(shape)) if shape else 1
        if dtype == _DT_STRING:
            lengths, i, crc = [], 0, 0
            for _ in range(n):
                length, i = _varint(data, i)
                lengths.append(length)
                crc = _crc32c(struct.pack("<I", length) if length <= 0xFFFFFFFF else struct.pack("<Q", length), crc)
            crc = _crc32c(data[i:], crc)
            i += 4
            arr = np.empty(n, dtype=object)
            for k, length in enumerate(lengths):
                arr[k], i = data[i: i + length], i + length
            arr = arr.reshape(shape)
        elif dtype in _DTYPES:
            crc = _crc32c(data)
            arr = np.frombuffer(data, dtype=_DTYPES[dtype]).reshape(shape).copy()
        else:
            continue  # a dtype this reader has no use for (resource, variant, ...)
        if _mask(crc) != want:
            raise ValueError(f"{key.decode(errors='replace')}: crc32c mismatch (the data file is corrupt)")
        out[key.decode()] = arr
    return out


def _tensor_proto(buf: bytes) -> np.ndarray:
    f = _fields(buf)
    dtype = _one(f, 1, 0)
    shape = [_one(_fields(d), 1, 0) for d in _fields(_one(f, 2, b"")).get(2, [])]
    if dtype == _DT_STRING:
        return np.array(f.get(8, []), dtype=object).reshape(shape)
    if dtype == 9:
        if f.get(4):
            return np.frombuffer(_one(f, 4), "<i8").reshape(shape).copy()
        vals = [v - (1 << 64) if v >= 1 << 63 else v for v in _packed_ints(f.get(10, []))]
        return np.array(vals, dtype=np.int64).reshape(shape)
    raise ValueError(f"a lookup-table constant of dtype {dtype} (expected string or int64)")


# ------------------------------------------------------------------ the Keras model


@dataclass
class _Files:
    metadata: bytes
    saved_model: bytes
    prefix: str
    tmp: tempfile.TemporaryDirectory | None = field(default=None, repr=False)


def _open(path: Path) -> _Files:
    """The SavedModel's files from a folder or a .zip holding one folder (extracted to a temp dir)."""
    tmp = None
    root = path
    if path.is_file():
        if not zipfile.is_zipfile(path):
            raise ValueError("neither a zip archive nor a SavedModel folder")
        tmp = tempfile.TemporaryDirectory(prefix="kiln-nsfw-keras-")
        with zipfile.ZipFile(path) as z:
            members = [m for m in z.namelist() if m.endswith("keras_metadata.pb")]
            if len(members) != 1:
                raise ValueError(f"the zip holds {len(members)} keras_metadata.pb files, not one")
            base = members[0][: -len("keras_metadata.pb")]
            for m in z.infolist():
                if not m.filename.startswith(base) or m.is_dir():
                    continue
                rel = m.filename[len(base):]
                if rel.startswith(("/", "..")) or ".." in Path(rel).parts:
                    raise ValueError(f"unsafe member name {m.filename!r}")
                dest = Path(tmp.name) / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(z.read(m))  # zipfile checks each member's CRC
        root = Path(tmp.name)
    for name in ("keras_metadata.pb", "saved_model.pb", "variables/variables.index"):
        if not (root / name).is_file():
            raise ValueError(f"no {name} (not a Keras SavedModel)")
    return _Files((root / "keras_metadata.pb").read_bytes(), (root / "saved_model.pb").read_bytes(),
                  str(root / "variables" / "variables"), tmp)


def _vocabularies(files: _Files, mce_path: str, encoding: list[str], nodes_by_path: dict, ckpt: dict) -> dict:
    """{column: (tokens as str, int64 indices)} of MultiCategoryEncoding's StringLookup columns."""
    mg = _fields(_one(_fields(files.saved_model), 2, b""))
    graph = _fields(_one(mg, 2, b""))
    consts = {}
    for n in graph.get(1, []):
        nf = _fields(n)
        if _one(nf, 2, b"") == b"Const":
            for a in nf.get(5, []):
                af = _fields(a)
                if _one(af, 1) == b"value":
                    consts[_one(nf, 1, b"").decode()] = _one(_fields(_one(af, 2, b"")), 8, b"")
    og = _fields(_one(mg, 7, b""))
    objs = [_fields(n) for n in og.get(1, [])]
    concrete = {}
    for entry in og.get(2, []):
        ef = _fields(entry)
        concrete[_one(ef, 1, b"").decode()] = _packed_ints(_fields(_one(ef, 2, b"")).get(2, []))

    def child(node_id: int, name: str) -> int:
        for ref in objs[node_id].get(1, []):
            rf = _fields(ref)
            if _one(rf, 2, b"").decode() == name:
                return _one(rf, 1, 0)
        raise ValueError(f"object graph: node {node_id} has no child {name!r}")

    out = {}
    for col, enc in enumerate(encoding):
        if enc == "none":
            continue
        if enc != "int":
            raise ValueError(f"column {col} has encoding {enc!r} (only 'none' and 'int' exist in autokeras 1.0)")
        path = f"{mce_path}.encoding_layers.{col}"
        ckpt_prefix = path.removeprefix("root.").replace(".", "/") + "/token_counts/.ATTRIBUTES/table-"
        keys, counts = ckpt.get(ckpt_prefix + "keys"), ckpt.get(ckpt_prefix + "values")
        if keys is not None and counts is not None and keys.size:
            # Keras 2.8 finalize_state: np.lexsort((tokens, counts))[::-1]; OOV at 0, tokens from 1
            order = np.lexsort((np.array(list(keys), dtype=bytes), counts))[::-1]
            tokens = [keys[i].decode() for i in order]
            out[col] = (tokens, np.arange(1, len(tokens) + 1, dtype=np.int64))
            continue
        if path not in nodes_by_path:
            raise ValueError(f"no StringLookup object for categorical column {col}")
        init = _fields(_one(objs[child(child(nodes_by_path[path], "lookup_table"), "_initialize")], 6, b""))
        bound = concrete.get(_one(init, 1, b"").decode(), [])
        arrays = []
        for node_id in bound:
            op = _one(_fields(_one(objs[node_id], 9, b"") or b""), 1)
            if op is not None:
                arrays.append(_tensor_proto(consts[op.decode()]))
        strs = [a for a in arrays if a.dtype == object]
        ints = [a for a in arrays if a.dtype == np.int64]
        if len(strs) != 1 or len(ints) != 1 or strs[0].shape != ints[0].shape or strs[0].ndim != 1:
            raise ValueError(f"column {col}: the lookup table's initializer does not hold one key and one value vector")
        out[col] = ([t.decode() for t in strs[0]], ints[0].astype(np.int64))
    return out


def read_keras_nsfw(path: str | os.PathLike) -> tuple[list[dict], dict]:
    """(layers, meta) of LAION's autokeras NSFW detector (a .zip or the SavedModel folder).

    layers, in forward order: {"kind": "lookup", "columns": {col: (tokens, indices)}} (if any
    categorical column), {"kind": "normalization", "mean", "variance", "epsilon"}, then
    {"kind": "dense", "kernel" [in, out], "bias", "activation": "relu" | "sigmoid" | "linear"} per
    Dense layer (a following ReLU / sigmoid Activation layer folded in). meta: input_dim, keras_version,
    model name, source file, its sha256. A file that is missing or not this layout ->
    KerasNsfwFormatError (a ModelLoadError naming --nsfw-head, the file and what to do)."""
    p = Path(path)
    if not p.exists():
        raise KerasNsfwFormatError(path, "the file does not exist")
    try:
        files = _open(p)
    except (ValueError, zipfile.BadZipFile, EOFError, OSError) as e:
        raise KerasNsfwFormatError(path, f"not LAION's autokeras NSFW SavedModel ({_short(e)})") from e
    try:
        return _read(files, p)
    except (ValueError, KeyError, IndexError, struct.error, json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
        raise KerasNsfwFormatError(path, f"not LAION's autokeras NSFW SavedModel layout or damaged ({_short(e)})") from e
    finally:
        if files.tmp is not None:
            files.tmp.cleanup()


def _short(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def _read(files: _Files, path: Path) -> tuple[list[dict], dict]:
    nodes = [_fields(n) for n in _fields(files.metadata).get(1, [])]
    by_path = {_one(n, 3, b"").decode(): n for n in nodes}
    if "root" not in by_path:
        raise ValueError("keras_metadata.pb has no root object")
    root = json.loads(_one(by_path["root"], 5, b"{}"))
    layer_paths = {}
    ids_by_path = {}
    for p, n in by_path.items():
        ids_by_path[p] = _one(n, 2, 0)
        parts = p.split(".")
        if len(parts) == 2 and parts[0] == "root" and parts[1].startswith(("layer-", "layer_with_weights-")):
            layer_paths[json.loads(_one(n, 5, b"{}"))["name"]] = p
    cfg = root.get("config") or {}
    layers = cfg.get("layers")
    if not isinstance(layers, list) or not layers:
        raise ValueError(f"the root object is a {root.get('class_name')!r}, not a Functional model with layers")
    ckpt = read_tensor_bundle(files.prefix)

    def var(layer_name: str, name: str) -> np.ndarray:
        key = layer_paths[layer_name].removeprefix("root.").replace(".", "/") + f"/{name}/.ATTRIBUTES/VARIABLE_VALUE"
        if key not in ckpt:
            raise ValueError(f"the checkpoint has no {key}")
        return ckpt[key]

    # The model must be one chain: each layer's only input is the previous layer.
    prev = None
    out: list[dict] = []
    input_dim = None
    for L in layers:
        cls, c, name = L.get("class_name"), L.get("config") or {}, L.get("name")
        inbound = L.get("inbound_nodes") or []
        src = [n[0] for node in inbound for n in node]
        if prev is not None and src != [prev]:
            raise ValueError(f"layer {name!r} does not take the previous layer as its only input (not a chain)")
        prev = name
        if cls == "InputLayer":
            shape = (c.get("batch_input_shape") or {}).get("items") or c.get("batch_input_shape")
            input_dim = int(shape[-1])
        elif cls in ("Custom>MultiCategoryEncoding", "MultiCategoryEncoding"):
            encoding = list(c["encoding"])
            if input_dim is not None and len(encoding) != input_dim:
                raise ValueError(f"MultiCategoryEncoding has {len(encoding)} columns for a {input_dim}-d input")
            cols = _vocabularies(files, layer_paths[name], encoding, ids_by_path, ckpt)
            if cols:
                out.append({"kind": "lookup", "columns": cols})
        elif cls == "Normalization":
            axis = (c.get("axis") or {}).get("items", c.get("axis"))
            if list(np.atleast_1d(axis)) != [-1]:
                raise ValueError(f"Normalization over axis {axis}, not -1")
            mean, variance = var(name, "mean"), var(name, "variance")
            out.append({"kind": "normalization", "mean": mean.astype(np.float32).reshape(-1),
                        "variance": variance.astype(np.float32).reshape(-1), "epsilon": _EPSILON})
        elif cls == "Dense":
            act = c.get("activation", "linear")
            if act not in ("linear", "relu", "sigmoid"):
                raise ValueError(f"Dense {name!r} has activation {act!r}")
            if not c.get("use_bias", True):
                raise ValueError(f"Dense {name!r} has no bias")
            kernel, bias = var(name, "kernel"), var(name, "bias")
            out.append({"kind": "dense", "name": name, "kernel": kernel.astype(np.float32),
                        "bias": bias.astype(np.float32), "activation": act})
        elif cls == "ReLU" or (cls == "Activation" and c.get("activation") in ("relu", "sigmoid")):
            act = "relu" if cls == "ReLU" else c["activation"]
            if cls == "ReLU" and (c.get("max_value") is not None or float(c.get("negative_slope") or 0)
                                  or float(c.get("threshold") or 0)):
                raise ValueError(f"ReLU {name!r} is not a plain ReLU ({c})")
            if not out or out[-1]["kind"] != "dense" or out[-1]["activation"] != "linear":
                raise ValueError(f"{cls} {name!r} does not follow a linear Dense layer")
            out[-1]["activation"] = act
        elif cls == "Dropout":
            continue  # identity at inference
        else:
            raise ValueError(f"unsupported layer {cls!r} ({name!r})")

    kinds = [x["kind"] for x in out]
    dense = [x for x in out if x["kind"] == "dense"]
    if "normalization" not in kinds or not dense or kinds.index("normalization") > kinds.index("dense"):
        raise ValueError(f"expected Normalization then Dense layers, found {kinds}")
    acts = [d["activation"] for d in dense]
    if acts[:-1] != ["relu"] * (len(dense) - 1) or acts[-1] != "sigmoid":
        raise ValueError(f"expected ReLU between the Dense layers and a sigmoid at the end, found {acts}")
    norm = out[kinds.index("normalization")]
    width = norm["mean"].shape[0]
    if input_dim is None:
        input_dim = width
    if norm["variance"].shape != (width,) or width != input_dim:
        raise ValueError(f"Normalization width {width} does not match the {input_dim}-d input")
    for d in dense:
        if d["kernel"].ndim != 2 or d["kernel"].shape[0] != width or d["bias"].shape != (d["kernel"].shape[1],):
            raise ValueError(f"Dense {d['name']!r}: kernel {d['kernel'].shape} / bias {d['bias'].shape} "
                             f"do not chain from width {width}")
        width = d["kernel"].shape[1]
    if width != 1:
        raise ValueError(f"the last Dense layer has {width} outputs, not 1")
    for col, (tokens, indices) in (out[0]["columns"].items() if kinds[0] == "lookup" else []):
        if not 0 <= col < input_dim or len(tokens) != len(indices):
            raise ValueError(f"lookup column {col} is out of range or its vocabulary is ragged")
    meta = {
        "input_dim": int(input_dim),
        "keras_version": str(root.get("keras_version", "")),
        "model_name": str(cfg.get("name", "")),
        "source_file": path.name,
        "source_sha256": hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "",
    }
    return out, meta


# ------------------------------------------------------------------ to kiln's keras_dense safetensors


def to_safetensors_dict(layers: list[dict], meta: dict) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(tensors, metadata) of the "keras_dense" layout NsfwScorer loads (see the module docstring)."""
    tensors: dict[str, np.ndarray] = {}
    for x in layers:
        if x["kind"] == "lookup":
            cols = sorted(x["columns"])
            tensors["lookup.columns"] = np.array(cols, dtype=np.int64)
            for j, col in enumerate(cols):
                tokens, indices = x["columns"][col]
                keys = np.array([float(t) for t in tokens], dtype=np.float64)
                bad = [t for t, k in zip(tokens, keys) if "%f" % k != t]
                if bad:
                    raise ValueError(f"column {col}: lookup tokens that are not printf('%f') numbers: {bad[:3]}")
                tensors[f"lookup.{j}.keys"] = keys
                tensors[f"lookup.{j}.values"] = np.asarray(indices, dtype=np.int64)
        elif x["kind"] == "normalization":
            tensors["norm.mean"] = np.ascontiguousarray(x["mean"], dtype=np.float32)
            tensors["norm.variance"] = np.ascontiguousarray(x["variance"], dtype=np.float32)
    for i, d in enumerate(x for x in layers if x["kind"] == "dense"):
        tensors[f"dense.{i}.weight"] = np.ascontiguousarray(d["kernel"].T, dtype=np.float32)
        tensors[f"dense.{i}.bias"] = np.ascontiguousarray(d["bias"], dtype=np.float32)
    md = {
        "layout": KERAS_LAYOUT,
        "activation": "sigmoid",
        "norm_epsilon": repr(_EPSILON),
        "input_precision": "float16",
        "lookup_format": "%f",
        "converted_from": "LAION autokeras CLIP NSFW detector (Keras SavedModel) via filters.nsfw_keras",
    }
    md.update({k: str(v) for k, v in meta.items()})
    return tensors, md


def convert(in_path: str | os.PathLike, out_path: str | os.PathLike, *, force: bool = False) -> Path:
    """Read IN (LAION's .zip or SavedModel folder), write OUT.safetensors atomically; returns OUT.

    An existing OUT -> FileExistsError unless force; a bad IN -> KerasNsfwFormatError."""
    from safetensors.numpy import save_file

    out = Path(out_path)
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists; pass --force to overwrite it")
    layers, meta = read_keras_nsfw(in_path)
    tensors, md = to_safetensors_dict(layers, meta)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=md)
        os.replace(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return out


# ------------------------------------------------------------------ a writer of the same format (tests)


def _table_block(entries: list[tuple[bytes, bytes]]) -> bytes:
    body = bytearray()
    restarts = []
    for k, v in entries:
        restarts.append(len(body))
        body += _put_varint(0) + _put_varint(len(k)) + _put_varint(len(v)) + k + v
    for r in restarts or [0]:
        body += struct.pack("<I", r)
    body += struct.pack("<I", len(restarts or [0]))
    return bytes(body)


def _write_table(entries: dict[bytes, bytes]) -> bytes:
    buf = bytearray()

    def add(block: bytes) -> bytes:
        off = len(buf)
        buf.extend(block + b"\0" + struct.pack("<I", _mask(_crc32c(block + b"\0"))))
        return _put_varint(off) + _put_varint(len(block))

    items = sorted(entries.items())
    data_handle = add(_table_block(items))
    meta_handle = add(_table_block([]))
    index_handle = add(_table_block([(items[-1][0], data_handle)]))
    footer = meta_handle + index_handle
    buf.extend(footer + b"\0" * (40 - len(footer)) + struct.pack("<Q", _MAGIC))
    return bytes(buf)


def _write_bundle(prefix: Path, tensors: dict[str, np.ndarray]) -> None:
    data = bytearray()
    entries = {b"": _pb((1, 1), (3, _pb((1, 1))))}  # num_shards 1, little endian, version {producer: 1}
    codes = {np.dtype(v): k for k, v in _DTYPES.items()}
    for key, arr in sorted(tensors.items()):
        arr = np.asarray(arr)
        shape = _pb(*[(2, _pb((1, int(s)))) for s in arr.shape])
        if arr.dtype == object:
            blob = b"".join(_put_varint(len(s)) for s in arr.reshape(-1))
            crc = 0
            for s in arr.reshape(-1):
                crc = _crc32c(struct.pack("<I", len(s)), crc)
            lc = struct.pack("<I", _mask(crc))
            crc = _crc32c(lc, crc)
            for s in arr.reshape(-1):
                crc = _crc32c(s, crc)
            blob = blob + lc + b"".join(arr.reshape(-1))
            dtype = _DT_STRING
        else:
            dtype = codes[np.dtype(arr.dtype)]
            blob = np.ascontiguousarray(arr, dtype=_DTYPES[dtype]).tobytes()
            crc = _crc32c(blob)
        entry = _pb((1, dtype), (2, shape), (4, len(data)), (5, len(blob)))
        entry += _put_varint(6 << 3 | 5) + struct.pack("<I", _mask(crc))
        entries[key.encode()] = entry
        data += blob
    prefix.parent.mkdir(parents=True, exist_ok=True)
    Path(str(prefix) + ".index").write_bytes(_write_table(entries))
    Path(str(prefix) + ".data-00000-of-00001").write_bytes(bytes(data))


def _tensor_pb(arr: np.ndarray) -> bytes:
    shape = _pb(*[(2, _pb((1, int(s)))) for s in arr.shape])
    if arr.dtype == object:
        return _pb((1, _DT_STRING), (2, shape), *[(8, s) for s in arr.reshape(-1)])
    return _pb((1, 9), (2, shape), (4, np.ascontiguousarray(arr, "<i8").tobytes()))


def write_keras_nsfw(out: str | os.PathLike, input_dim: int, hidden: tuple[int, ...], *, seed: int = 0,
                     categorical: dict[int, list[str]] | None = None, dropout_after: int | None = None,
                     as_zip: bool = True, token_counts: bool = False) -> Path:
    """Write a LAION-format autokeras NSFW SavedModel with random weights; returns the .zip (or folder).

    Same files, variable names (`layer_with_weights-K/{mean,variance,count,kernel,bias}/.ATTRIBUTES/
    VARIABLE_VALUE`), layer names/classes (input_1, multi_category_encoding, normalization, dense,
    re_lu, ..., dropout, classification_head_1) and object-graph path to the StringLookup vocabularies
    as LAION's files. `hidden`: Dense widths before the final Dense(1) -- (32, 32) with
    dropout_after=1 is B/32's, (64, 512, 256) L/14's. `categorical`: {column: vocabulary tokens
    in index order (1..V)}; token_counts=True stores them as Keras `token_counts` instead (counts
    descending) and leaves the initializer constants empty."""
    rng = np.random.default_rng(seed)
    categorical = dict(sorted((categorical or {}).items()))
    out = Path(out)
    name = out.name.removesuffix(".zip") if as_zip else out.name
    folder = Path(tempfile.mkdtemp(prefix="kiln-keras-")) / name if as_zip else out
    (folder / "variables").mkdir(parents=True, exist_ok=True)
    (folder / "assets").mkdir(exist_ok=True)

    encoding = ["int" if c in categorical else "none" for c in range(input_dim)]
    mean = (rng.standard_normal(input_dim) * 0.03).astype(np.float32)
    variance = rng.uniform(4e-4, 1e-2, input_dim).astype(np.float32)
    for c, toks in categorical.items():
        mean[c] = len(toks) / 4
        variance[c] = (len(toks) / 3) ** 2
    ckpt: dict[str, np.ndarray] = {
        "layer_with_weights-1/mean/.ATTRIBUTES/VARIABLE_VALUE": mean,
        "layer_with_weights-1/variance/.ATTRIBUTES/VARIABLE_VALUE": variance,
        "layer_with_weights-1/count/.ATTRIBUTES/VARIABLE_VALUE": np.array(242067, dtype=np.int64),
        "_CHECKPOINTABLE_OBJECT_GRAPH": np.array(b"", dtype=object),
    }
    for m in (0, 1):
        for v in ("count", "total"):
            ckpt[f"keras_api/metrics/{m}/{v}/.ATTRIBUTES/VARIABLE_VALUE"] = np.array(0.0, np.float32)
    for c, toks in categorical.items():
        base = f"layer_with_weights-0/encoding_layers/{c}/token_counts/.ATTRIBUTES/table-"
        if token_counts:
            ckpt[base + "keys"] = np.array([t.encode() for t in toks], dtype=object)
            ckpt[base + "values"] = np.arange(len(toks) + 100, 100, -1, dtype=np.int64)
        else:
            ckpt[base + "keys"] = np.empty(0, dtype=object)
            ckpt[base + "values"] = np.empty(0, dtype=np.int64)

    def dense_cfg(lname: str, units: int, inbound: str) -> dict:
        return {"class_name": "Dense", "config": {"name": lname, "trainable": True, "dtype": "float32", "units": units,
                "activation": "linear", "use_bias": True}, "name": lname, "inbound_nodes": [[[inbound, 0, 0, {}]]]}

    layers = [
        {"class_name": "InputLayer", "config": {"batch_input_shape": {"class_name": "__tuple__", "items": [None, input_dim]},
         "dtype": "float64", "sparse": False, "ragged": False, "name": "input_1"}, "name": "input_1", "inbound_nodes": []},
        {"class_name": "Custom>MultiCategoryEncoding", "config": {"name": "multi_category_encoding", "trainable": True,
         "dtype": "float32", "encoding": encoding}, "name": "multi_category_encoding",
         "inbound_nodes": [[["input_1", 0, 0, {}]]]},
        {"class_name": "Normalization", "config": {"name": "normalization", "trainable": True, "dtype": "float32",
         "axis": {"class_name": "__tuple__", "items": [-1]}, "mean": None, "variance": None}, "name": "normalization",
         "inbound_nodes": [[["multi_category_encoding", 0, 0, {}]]]},
    ]
    paths = {"input_1": "layer-0", "multi_category_encoding": "layer_with_weights-0", "normalization": "layer_with_weights-1"}
    prev, width, k = "normalization", input_dim, 2
    widths = list(hidden) + [1]
    for i, units in enumerate(widths):
        lname = "dense" if i == 0 else f"dense_{i}"
        layers.append(dense_cfg(lname, units, prev))
        paths[lname] = f"layer_with_weights-{k}"
        ckpt[f"layer_with_weights-{k}/kernel/.ATTRIBUTES/VARIABLE_VALUE"] = (
            rng.standard_normal((width, units)) * np.sqrt(2.0 / width)).astype(np.float32)
        ckpt[f"layer_with_weights-{k}/bias/.ATTRIBUTES/VARIABLE_VALUE"] = (rng.standard_normal(units) * 0.1).astype(np.float32)
        k, prev, width = k + 1, lname, units
        if i < len(widths) - 1:
            rname = "re_lu" if i == 0 else f"re_lu_{i}"
            layers.append({"class_name": "ReLU", "config": {"name": rname, "trainable": True, "dtype": "float32",
                           "max_value": None, "negative_slope": 0.0, "threshold": 0.0}, "name": rname,
                           "inbound_nodes": [[[prev, 0, 0, {}]]]})
            prev = rname
            if dropout_after is not None and i == dropout_after:
                layers.append({"class_name": "Dropout", "config": {"name": "dropout", "trainable": True,
                               "dtype": "float32", "rate": 0.5, "noise_shape": None, "seed": None}, "name": "dropout",
                               "inbound_nodes": [[[prev, 0, 0, {}]]]})
                prev = "dropout"
    layers.append({"class_name": "Activation", "config": {"name": "classification_head_1", "trainable": True,
                   "dtype": "float32", "activation": "sigmoid"}, "name": "classification_head_1",
                   "inbound_nodes": [[[prev, 0, 0, {}]]]})
    n = 0
    for L in layers:
        if L["name"] not in paths:
            paths[L["name"]] = f"layer-{n}"
        n += 1
    model = {"name": "model", "class_name": "Functional", "config": {"name": "model", "layers": layers,
             "input_layers": [["input_1", 0, 0]], "output_layers": [["classification_head_1", 0, 0]]},
             "keras_version": "2.8.0", "backend": "tensorflow"}

    # Object graph: 0 root; one node per layer; StringLookup -> lookup_table -> _initialize; constants.
    objs: list[list[tuple[int, object]]] = [[]]
    concrete: list[bytes] = []
    consts: list[bytes] = []
    md_nodes = [_pb((3, "root"), (4, "_tf_keras_network"), (5, json.dumps(model)), (6, _pb((1, 2), (2, 1))))]

    def new(*items) -> int:
        objs.append(list(items))
        return len(objs) - 1

    def ref(parent: int, name: str, node_id: int) -> None:
        objs[parent].append((1, _pb((1, node_id), (2, name))))

    layer_ids = {}
    for L in layers:
        nid = new((4, _pb((1, "_tf_keras_layer"))))
        layer_ids[L["name"]] = nid
        ref(0, paths[L["name"]], nid)
        md = {"name": L["name"], "class_name": L["class_name"], "config": L["config"]}
        md_nodes.append(_pb((2, nid), (3, "root." + paths[L["name"]]), (4, "_tf_keras_layer"), (5, json.dumps(md)),
                            (6, _pb((1, 2), (2, 1)))))
    enc_list = new((4, _pb((1, "trackable_list_wrapper"))))
    ref(layer_ids["multi_category_encoding"], "encoding_layers", enc_list)
    for i, (c, toks) in enumerate(categorical.items()):
        sl = new((4, _pb((1, "_tf_keras_layer"))))
        ref(enc_list, str(c), sl)
        md_nodes.append(_pb((2, sl), (3, f"root.layer_with_weights-0.encoding_layers.{c}"), (4, "_tf_keras_layer"),
                            (5, json.dumps({"name": f"string_lookup_{i}", "class_name": "StringLookup"}))))
        table = new((10, b""))
        ref(sl, "lookup_table", table)
        fname = f"__inference__initializer_{1000 + i}"
        ref(table, "_initialize", new((6, _pb((1, fname)))))
        keys = np.array([] if token_counts else [t.encode() for t in toks], dtype=object)
        vals = np.arange(1, len(keys) + 1, dtype=np.int64)
        bound = [table]
        for arr in (keys, vals):
            op = f"Const_{len(consts)}"
            consts.append(_pb((1, op), (2, "Const"), (5, _pb((1, "dtype"), (2, _pb((6, 7 if arr.dtype == object else 9))))),
                              (5, _pb((1, "value"), (2, _pb((8, _tensor_pb(arr))))))))
            bound.append(new((9, _pb((1, op)))))
        concrete.append(_pb((1, fname), (2, _pb((2, b"".join(_put_varint(b) for b in bound))))))
    graph = _pb(*[(1, c) for c in consts])
    og = _pb(*[(1, _pb(*items)) for items in objs], *[(2, c) for c in concrete])
    (folder / "saved_model.pb").write_bytes(_pb((1, 1), (2, _pb((2, graph), (7, og)))))
    (folder / "keras_metadata.pb").write_bytes(_pb(*[(1, n) for n in md_nodes]))
    _write_bundle(folder / "variables" / "variables", ckpt)
    if not as_zip:
        return folder
    out.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        for f in sorted(folder.rglob("*")):
            z.write(f, f"{name}/{f.relative_to(folder)}")
    return out


# ------------------------------------------------------------------ CLI


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m filters.nsfw_keras",
                                 description="Convert LAION's autokeras CLIP NSFW detector to a kiln NSFW head (safetensors).")
    ap.add_argument("input", help="clip_autokeras_nsfw_b32.zip / clip_autokeras_binary_nsfw.zip, or the unzipped folder")
    ap.add_argument("output", help="OUT.safetensors (pass it to --nsfw-head)")
    ap.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    args = ap.parse_args(argv)
    if not str(args.output).endswith(".safetensors"):
        print(f"error: OUT must end in .safetensors (got {args.output})", file=sys.stderr)
        return 2
    try:
        out = convert(args.input, args.output, force=args.force)
    except ModelLoadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except FileExistsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: cannot write {args.output}: {e.strerror or e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
