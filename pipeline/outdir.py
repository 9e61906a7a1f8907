"""The output directory of `kiln prepare`: what kiln writes there, and the only files it ever deletes.

kiln's files, by exact name (relative to the output directory):

    shards/NNNNNN.tar  meta/NNNNNN.parquet  rejects/NNNNNN.parquet
    manifest.json  stats.json  _SUCCESS
    README.md                  only when it carries CARD_MARKER (the dataset card kiln wrote)
    training_summary.md        only when it carries SUMMARY_MARKER (the draft EU training-content summary)
    croissant.json  training_summary.json
                               only when they carry JSON_MARKER_KEY (kiln's Croissant file, the summary's JSON)
    card_plots/<PLOT_NAMES>.png
    <any of those>.tmp-<12 hex>  a file being written (every file appears by rename from one)

Everything else under the directory is the user's: `check_output` refuses to start over it unless
--overwrite, and nothing here deletes it (`clear_output` and `remove_temp_files` delete kiln's files
only). A README.md, training_summary.md, croissant.json or training_summary.json without kiln's
marker is never replaced (MARKED_NAMES, `is_kiln_document`).

No output path is ever read as a glob: `list_files` lists a directory (os.scandir locally, Beam's
FileSystems.match with every glob character of the directory escaped elsewhere), and `delete_files`
deletes exactly the paths it is given, even on file systems whose delete matches patterns.

This module imports Beam's FileSystems and the standard library only.
"""

from __future__ import annotations

import contextlib
import os
import re
import uuid
import warnings

from apache_beam.io.filesystem import CompressionTypes, FileMetadata
from apache_beam.io.filesystems import FileSystems

from pipeline.config import ConfigError

CARD_NAME = "README.md"  # the dataset card (the Hub's name for it)
PLOTS_DIR = "card_plots"  # the card's plots, beside it
# Every plot the card may write (pipeline.card.plots.draw's keys): card_plots/<name>.png.
PLOT_NAMES = ("toxicity", "clip_similarity", "punsafe", "image_sizes", "caption_chars", "t5_len", "samples")
# The line that marks a README.md as kiln's card; a README.md without it is the user's and is never replaced.
CARD_MARKER = ("<!-- kiln:dataset-card -- written by kiln (`kiln prepare`, `kiln card`), which replaces this file "
               "on every run. Delete this line to make the file your own: kiln then never overwrites it. -->")
_MARKER_LINE = re.compile(rb"^<!-- kiln:dataset-card\b", re.MULTILINE)
_MARKER_WITHIN = 1 << 16  # bytes of README.md searched for the marker (it follows the YAML block)
# The documents `kiln card` writes beside the card (pipeline.card): Croissant JSON-LD, and the draft EU
# training-content summary as Markdown and JSON.
CROISSANT_NAME = "croissant.json"
SUMMARY_MD_NAME = "training_summary.md"
SUMMARY_JSON_NAME = "training_summary.json"
SUMMARY_MARKER = ("<!-- kiln:training-summary -- written by kiln (`kiln prepare`, `kiln card`), which replaces this "
                  "file on every run. Delete this line to make the file your own: kiln then never overwrites it. -->")
_SUMMARY_MARKER_LINE = re.compile(rb"^<!-- kiln:training-summary\b", re.MULTILINE)
# A JSON document is kiln's when its object's first key is this one (any value): a JSON-LD processor
# reads it as a term of its own IRI scheme, so croissant.json stays valid Croissant.
JSON_MARKER_KEY = "kiln:generated"
JSON_MARKER = ("written by kiln (`kiln prepare`, `kiln card`), which replaces this file on every run; delete this key "
               "to make the file your own: kiln then never overwrites it")
_JSON_MARKER = re.compile(rb'\A\s*\{\s*"' + re.escape(JSON_MARKER_KEY.encode()) + rb'"\s*:')
# kiln's own only with their marker inside; written by pipeline.card.write_card, README.md last.
MARKED_NAMES = (CROISSANT_NAME, SUMMARY_JSON_NAME, SUMMARY_MD_NAME, CARD_NAME)

TOP_FILES = ("manifest.json", "stats.json", "_SUCCESS")
SHARD_FILES = {"shards": re.compile(r"\d{6}\.tar"), "meta": re.compile(r"\d{6}\.parquet"),
               "rejects": re.compile(r"\d{6}\.parquet")}
PROBE_NAME = "_kiln_write_check"  # check_output's probe (a temp file: created and removed at once)
TEMP_SUFFIX = re.compile(r"\.tmp-[0-9a-f]{12}")
GLOB_CHARS = "[]*?"
_PLOT_FILE = re.compile("(?:" + "|".join(map(re.escape, PLOT_NAMES)) + r")\.png")
_DELETE_BY_PATTERN = ("gs",)  # schemes whose FileSystem.delete matches its paths as globs (local: handled apart)


# -- paths -----------------------------------------------------------------------------------------


def escape_glob(path: str) -> str:
    """`path` as a Beam FileSystems.match pattern that matches exactly `path`: every glob character
    becomes a one-character class (`[` -> `[[]`, `]` -> `[]]`, `*` -> `[*]`, `?` -> `[?]`)."""
    return "".join(f"[{c}]" if c in GLOB_CHARS else c for c in path)


def is_local(path: str) -> bool:
    return "://" not in path


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


def temp_name(path: str) -> str:
    """A unique temp name beside `path` (what kiln writes before renaming it into place)."""
    return f"{path}.tmp-{uuid.uuid4().hex[:12]}"


def is_kiln_name(rel: str, temp: bool = False) -> bool:
    """Whether `rel` (a path relative to the output directory, '/'-separated) is one of kiln's file
    names (temp=True: one of kiln's temp files). README.md and the other MARKED_NAMES count only with
    their marker (is_kiln_document)."""
    if temp:
        m = TEMP_SUFFIX.search(rel)
        if not m or m.end() != len(rel):
            return False
        rel = rel[: m.start()]
        if rel in (*MARKED_NAMES, PROBE_NAME):
            return True
    folder, _, name = rel.rpartition("/")
    if not folder:
        return name in TOP_FILES
    if folder == PLOTS_DIR:
        return bool(_PLOT_FILE.fullmatch(name))
    pattern = SHARD_FILES.get(folder)
    return bool(pattern and pattern.fullmatch(name))


def _head(path: str) -> bytes | None:
    try:
        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
            return f.read(_MARKER_WITHIN)
    except (OSError, ValueError):
        return None


def is_kiln_card(path: str) -> bool:
    """Whether the file at `path` is a dataset card kiln wrote (a line of it starts with the marker)."""
    head = _head(path)
    return head is not None and bool(_MARKER_LINE.search(head))


def is_kiln_document(path: str, name: str | None = None) -> bool:
    """Whether the file at `path`, one of MARKED_NAMES (`name`, default: its file name), is kiln's:
    README.md and training_summary.md with their marker line, the JSON files with JSON_MARKER_KEY as
    their first key. False for a file that is missing or unreadable, or any other name."""
    name = name or path.rstrip("/").rsplit("/", 1)[-1]
    if name == CARD_NAME:
        return is_kiln_card(path)
    head = _head(path) if name in MARKED_NAMES else None
    if head is None:
        return False
    if name == SUMMARY_MD_NAME:
        return bool(_SUMMARY_MARKER_LINE.search(head))
    return bool(_JSON_MARKER.match(head))


# -- listing ---------------------------------------------------------------------------------------


def list_files(directory: str, recursive: bool = False) -> list[FileMetadata]:
    """The files in `directory` (recursive: and in its subdirectories), sorted by path; [] if it
    does not exist. The directory's name is never read as a glob: `out[1]` lists `out[1]`."""
    base = directory.rstrip("/")
    if is_local(base):
        return sorted(_list_local(base, recursive, set()), key=lambda m: m.path)
    pattern = f"{escape_glob(base)}/{'**' if recursive else '*'}"
    with _quiet_nested_set_warning():
        return sorted((m for r in FileSystems.match([pattern]) for m in r.metadata_list), key=lambda m: m.path)


@contextlib.contextmanager
def _quiet_nested_set_warning():
    """`[[]` (a literal `[`) makes Python's re warn "Possible nested set": the class is exact today."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Possible nested set", FutureWarning)
        yield


def _list_local(base: str, recursive: bool, seen: set):
    try:
        st = os.stat(base or "/")
        entries = list(os.scandir(base or "/"))
    except (FileNotFoundError, NotADirectoryError):
        return
    if (st.st_dev, st.st_ino) in seen:  # a symlink loop
        return
    seen.add((st.st_dev, st.st_ino))
    for e in entries:
        path = f"{base}/{e.name}"
        try:
            if e.is_dir():
                if recursive:
                    yield from _list_local(path, True, seen)
            elif e.is_file():
                st = e.stat()
                yield FileMetadata(path, st.st_size, st.st_mtime)
        except FileNotFoundError:  # gone while listing
            continue


def _rel(output: str, path: str) -> str:
    return path[len(output.rstrip("/")) + 1:]


def kiln_files(output: str, temp: bool = False) -> list[str]:
    """kiln's own files under `output` by exact name (temp=True: its temp files instead), sorted;
    README.md only if it is kiln's card. Never a file kiln did not write."""
    base = output.rstrip("/")
    out = []
    for folder in ("", *SHARD_FILES, PLOTS_DIR):
        for m in list_files(join(base, folder) if folder else base):
            rel = _rel(base, m.path)
            if is_kiln_name(rel, temp) or (not temp and rel in MARKED_NAMES and is_kiln_document(m.path, rel)):
                out.append(m.path)
    return sorted(out)


def foreign_files(output: str) -> list[str]:
    """Every file under `output` (recursively) that kiln did not write, sorted."""
    base = output.rstrip("/")
    out = []
    for m in list_files(base, recursive=True):
        rel = _rel(base, m.path)
        if is_kiln_name(rel) or is_kiln_name(rel, temp=True):
            continue
        if rel in MARKED_NAMES and is_kiln_document(m.path, rel):
            continue
        out.append(m.path)
    return out


# -- deleting and writing --------------------------------------------------------------------------


def delete_files(paths: list[str]) -> None:
    """Delete exactly these files (a missing one is skipped). No path is read as a pattern."""
    remote = []
    for p in paths:
        if is_local(p):
            with contextlib.suppress(FileNotFoundError):
                os.remove(p)
        else:
            remote.append(p)
    remote = [p for p in remote if FileSystems.exists(p)]
    if remote:
        with _quiet_nested_set_warning():
            FileSystems.delete([escape_glob(p) if FileSystems.get_scheme(p) in _DELETE_BY_PATTERN else p for p in remote])


def _remove_quietly(path: str) -> None:
    with contextlib.suppress(Exception):  # noqa: BLE001 - cleanup must not hide the error being raised
        delete_files([path])


def _replace(tmp: str, path: str) -> None:
    if is_local(path):
        os.replace(tmp, path)
        return
    if FileSystems.exists(path):
        delete_files([path])
    FileSystems.rename([tmp], [path])


def atomic_write(path: str, write_fn) -> None:
    """Write through `write_fn(fileobj)` to a temp name beside `path`, then rename it over `path`:
    readers see the old file or the whole new one. On any failure (a full disk, a read-only file
    system, Ctrl-C) the temp file is removed and the error propagates unchanged."""
    tmp = temp_name(path)
    try:
        f = FileSystems.create(tmp, compression_type=CompressionTypes.UNCOMPRESSED)
        try:
            write_fn(f)
        except BaseException:
            with contextlib.suppress(Exception):
                f.close()
            raise
        f.close()  # a full disk often says so here, when the last buffer is flushed
        _replace(tmp, path)
    except BaseException:
        _remove_quietly(tmp)
        raise


def write_bytes(path: str, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


# -- the checks and the clean-up `kiln prepare` runs ------------------------------------------------


def check_output(output: str, overwrite: bool, card: bool) -> list[str]:
    """Before any work: `output` is (or can be made) a directory kiln can write in, holding nothing
    kiln would destroy. Returns the files kiln did not write that stay untouched (--overwrite).

    Raises ConfigError (one line) when `output` is a file; cannot be created or written (read-only
    file system, permissions); holds a README.md that is not kiln's card, or a croissant.json /
    training_summary.md / training_summary.json kiln did not write, while the card is on (even with
    --overwrite); or, without --overwrite, holds any file kiln did not write."""
    base = output.rstrip("/") or "/"
    if is_local(base):
        if os.path.exists(base) and not os.path.isdir(base):
            raise ConfigError(f"--output {output} is a file, not a directory: choose a directory (kiln creates it if missing)")
        try:
            os.makedirs(base, exist_ok=True)
        except OSError as err:
            raise ConfigError(f"cannot create --output {output}: {err.strerror or err}; choose a directory you can write to") from None
    elif FileSystems.exists(base):
        raise ConfigError(f"--output {output} is a file, not a directory: choose a directory (kiln creates it if missing)")
    _probe(base, output)

    readme = join(base, CARD_NAME)
    if card and FileSystems.exists(readme) and not is_kiln_card(readme):
        raise ConfigError(f"{readme} is not a dataset card kiln wrote (it lacks kiln's marker line) and the card "
                          f"would replace it: move it or pass --no-card")
    for name in MARKED_NAMES:
        path = join(base, name)
        if card and name != CARD_NAME and FileSystems.exists(path) and not is_kiln_document(path, name):
            raise ConfigError(f"{path} is not a file kiln wrote (it lacks kiln's marker) and the card would replace it: "
                              f"move it or pass --no-card")
    foreign = foreign_files(base)
    if foreign and not overwrite:
        shown = ", ".join(_rel(base, p) for p in foreign[:3])
        more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
        raise ConfigError(f"--output {output} holds {len(foreign)} file(s) kiln did not write ({shown}{more}): "
                          f"choose an empty --output or pass --overwrite (kiln then deletes only its own files)")
    return foreign


def _probe(base: str, output: str) -> None:
    """Create and remove a kiln temp file in `base`: ConfigError if that cannot be done."""
    probe = temp_name(join(base, PROBE_NAME))
    try:
        with FileSystems.create(probe, compression_type=CompressionTypes.UNCOMPRESSED) as f:
            f.write(b"")
    except OSError as err:
        _remove_quietly(probe)
        reason = err.strerror or str(err).splitlines()[0]
        raise ConfigError(f"cannot write in --output {output}: {reason}; choose a directory you can write to "
                          f"(or fix its permissions)") from None
    try:
        delete_files([probe])
    except OSError as err:
        raise ConfigError(f"cannot delete files in --output {output} ({err.strerror or err}): kiln replaces its "
                          f"own files there; choose a directory you can write to") from None


def clear_output(output: str) -> list[str]:
    """--overwrite: delete kiln's own files under `output` (and its temp files); returns them.
    Nothing else is touched -- a README.md without kiln's marker, notes, other plots all stay."""
    paths = kiln_files(output) + kiln_files(output, temp=True)
    delete_files(paths)
    return paths


def remove_temp_files(output: str) -> list[str]:
    """Delete kiln's unfinished temp files under `output` (an interrupted run's); returns them."""
    paths = kiln_files(output, temp=True)
    delete_files(paths)
    return paths
