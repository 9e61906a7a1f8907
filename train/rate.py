"""Side-by-side human rating of two sample directories, Imagen's protocol (Saharia et al. 2022, §3,
DrawBench): for each prompt, two sets of up to 8 samples, and two questions -- "Which set of
images is of higher quality?" and "Which set of images better represents the text caption:
{caption}?" -- each answered "I prefer set A", "I'm indifferent" or "I prefer set B".

    kiln rate runs/a/samples runs/b/samples --out ratings/ [--rater NAME] [--port 0] [--seed 0]
    kiln rate --summary ratings/

The inputs are `kiln sample --out-dir DIR` directories: DIR/samples.parquet (prompt, category,
seed, stage, guidance, sampler, checkpoint_step, path) and the PNGs it lists (`path`, relative to
DIR). A prompt is rated when both directories have it; each set is that directory's images of the
prompt's final stage (the last of base, sr256, sr1024 it has), the first 8 by sample index. A
directory whose kiln footer says its sampling run was interrupted is refused; a samples.parquet
without that footer (another model's images, listed by hand with prompt, stage, path) is read.

The page is served by the standard library's ThreadingHTTPServer on 127.0.0.1 only, and serves
only the files the two samples.parquet list, by opaque number (`/img/17`): no path from a URL is
ever opened, and the URL does not tell which directory an image came from. Which directory is on
the left ("set A" on screen) is drawn per prompt from --seed (`left_side`) and recorded with every
answer. On screen, A and B are the sides; in the files, A and B are DIR_A and DIR_B.

--out holds kiln's files only (anything else there: refused, exit 2; nothing is ever deleted):

    rate.json       the session: both directories (absolute), the seed. A re-run with the same
                    directories resumes; other directories are refused.
    answers.jsonl   one JSON object per answer, appended and fsynced before the page moves on:
                    rater, prompt, category, left ("A": DIR_A was shown on the left), left_dir,
                    quality and caption ("A" = DIR_A preferred, "indifferent", "B" = DIR_B),
                    stage_a, stage_b, images_a, images_b (paths in their directories), time (UTC)
    summary.json    `kiln rate --summary`: per question, overall and per category, the share of
                    answers preferring A, indifferent, preferring B, each with a 95% Wilson score
                    interval, and n

A rater is named by --rater or on the page; reloading the page resumes at the first prompt that
rater has not answered. The summary counts each (rater, prompt) answer once and treats answers as
independent: with several raters per prompt the true uncertainty is larger than the intervals say.

Standard library only, plus pyarrow to read samples.parquet (imported when a command runs).
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import hashlib
import html
import json
import math
import os
import re
import secrets
import threading
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timezone
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path, PurePosixPath
from statistics import NormalDist
from urllib.parse import parse_qs, quote, urlsplit

from train.atomic import atomic_write
from train.errors import MissingFile, UserError, one_line, run_command

__all__ = ["IMAGES_PER_SET", "QUESTIONS", "STAGE_ORDER", "AnswerLog", "Pair", "RatingError", "RatingServer",
           "add_rate_args", "left_side", "load_samples", "main_rate", "make_server", "pair_prompts", "read_answers",
           "summarise", "wilson_interval"]

STAGE_ORDER = ("base", "sr256", "sr1024")  # = train.sample.STAGE_NAMES (not imported: that module loads torch)
IMAGES_PER_SET = 8  # Imagen §3 (DrawBench): each set holds 8 samples of the prompt
QUESTIONS = {  # Imagen §3 (DrawBench), word for word; {caption} is the prompt
    "quality": "Which set of images is of higher quality?",
    "caption": "Which set of images better represents the text caption: {caption}?",
}
CHOICES = ("A", "indifferent", "B")  # as saved: A = DIR_A, B = DIR_B
SCREEN_CHOICES = {"left": "I prefer set A", "indifferent": "I'm indifferent", "right": "I prefer set B"}
CONFIDENCE = 0.95

SAMPLES_NAME = "samples.parquet"
REQUIRED_COLUMNS = ("prompt", "stage", "path")
# = train.sample.SAMPLES_FOOTER_KEY: kiln's footer, whose JSON says whether the sampling run finished.
# A samples.parquet without it (images of another model, listed by hand) is read as complete.
SAMPLES_FOOTER_KEY = b"kiln.samples"
IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp"}
NO_CATEGORY = "(none)"

SESSION_NAME, ANSWERS_NAME, SUMMARY_NAME = "rate.json", "answers.jsonl", "summary.json"
KILN_NAMES = (SESSION_NAME, ANSWERS_NAME, SUMMARY_NAME)
FORMAT = "kiln-rate/1"
# A JSON file is kiln's when its first key is this one (the convention of pipeline.outdir, which
# train/ does not import); one without it is the user's and is never replaced.
JSON_MARKER_KEY = "kiln:generated"
JSON_MARKER = "written by `kiln rate`; delete this key to make the file your own: kiln then never overwrites it"
_TEMP_NAME = re.compile(r"\.(?:" + "|".join(map(re.escape, KILN_NAMES)) + r")\.tmp-[0-9a-f]{12}")  # train.atomic

MAX_RATER_CHARS = 64
MAX_FORM_BYTES = 64 * 1024
IDLE_CONNECTION_S = 60  # a connection that sends nothing (a browser's preconnect) is closed after this


class RatingError(UserError, ValueError):
    """A sample directory, ratings directory or answer that `kiln rate` cannot use."""


# -- the two sample directories ----------------------------------------------------------------------


@dataclass(frozen=True)
class PromptImages:
    """One directory's set for one prompt: its final stage's images (absolute, resolved) and the
    paths samples.parquet gives them."""

    category: str
    stage: str
    files: tuple[Path, ...]
    paths: tuple[str, ...]


def _listed_file(root: Path, rel, where: str) -> Path:
    """The file `rel` (a samples.parquet `path`) names inside `root` (resolved), or a RatingError:
    only relative paths that stay inside the directory, even through symlinks, and exist."""
    if not isinstance(rel, str) or not rel or "\\" in rel or "\0" in rel:
        raise RatingError(f"{where}: path {rel!r} is not a relative file path: write the directory again with "
                          "`kiln sample --out-dir`")
    pure = PurePosixPath(rel)
    if pure.is_absolute() or ".." in pure.parts:
        raise RatingError(f"{where}: path {rel!r} points outside {root}: only files inside the directory are served")
    file = (root / pure).resolve()
    if not file.is_relative_to(root):
        raise RatingError(f"{where}: path {rel!r} leads outside {root} (a symlink): only files inside it are served")
    if file.suffix.lower() not in IMAGE_TYPES:
        raise RatingError(f"{where}: path {rel!r} is not a PNG, JPEG or WebP image")
    if not file.is_file():
        raise MissingFile(f"{where}: {rel} does not exist in {root}: sample the directory again (or copy it whole)")
    return file


def load_samples(directory: str | Path, label: str) -> dict[str, PromptImages]:
    """{prompt: its final stage's images} of a `kiln sample --out-dir` directory, prompts in the
    order samples.parquet first lists them; up to IMAGES_PER_SET images each, by sample_index (else
    seed). `label` names the directory in errors (DIR_A / DIR_B). Only the columns prompt, stage
    and path are required, so a hand-made samples.parquet can list another model's images."""
    import pyarrow.parquet as pq  # here, not at import: `kiln --help` builds this command's parser

    root = Path(directory)
    if not root.is_dir():
        raise MissingFile(f"{label} {root}: no such directory: give a directory written by `kiln sample --out-dir`")
    table = root / SAMPLES_NAME
    if not table.is_file():
        raise MissingFile(f"{label} {root} has no {SAMPLES_NAME}: give a directory written by "
                          f"`kiln sample --out-dir {root}`")
    try:
        pf = pq.ParquetFile(table)
        names = pf.schema_arrow.names
        footer = (pf.schema_arrow.metadata or {}).get(SAMPLES_FOOTER_KEY)
        info = json.loads(footer) if footer is not None else {"complete": True}
        missing = [c for c in REQUIRED_COLUMNS if c not in names]
        rows = [] if missing else pf.read(columns=[c for c in (*REQUIRED_COLUMNS, "category", "sample_index", "seed")
                                                   if c in names]).to_pylist()
    except Exception as err:  # not Parquet, truncated, a string column that is not UTF-8, ...
        raise RatingError(f"{table} is not a readable Parquet file ({one_line(err)[:160]}): write it again with "
                          "`kiln sample --out-dir`") from err
    if not isinstance(info, dict) or info.get("complete") is not True:
        raise RatingError(f"{label} {root} holds an interrupted `kiln sample` run: re-run that command to finish it")
    if missing:
        raise RatingError(f"{table} has no column {', '.join(missing)}: write it with `kiln sample --out-dir`")
    real_root = root.resolve()
    found: dict[str, list[tuple]] = {}  # prompt -> (stage rank, sort key, file, path, category)
    for i, row in enumerate(rows):
        where = f"{table} row {i}"
        prompt, stage = row["prompt"], row["stage"]
        if not isinstance(prompt, str) or not prompt.strip():
            raise RatingError(f"{where} has no prompt: write the directory again with `kiln sample --out-dir`")
        if stage not in STAGE_ORDER:
            raise RatingError(f"{where}: stage {stage!r} is not one of {', '.join(STAGE_ORDER)}")
        file = _listed_file(real_root, row["path"], where)
        order = tuple((0, row[k]) if isinstance(row.get(k), int) else (1, 0) for k in ("sample_index", "seed")) + (i,)
        category = row.get("category")
        category = category if isinstance(category, str) and category.strip() else NO_CATEGORY
        found.setdefault(prompt, []).append((STAGE_ORDER.index(stage), order, file, row["path"], category))
    if not found:
        raise RatingError(f"{table} lists no images: sample some with `kiln sample --out-dir {root}`")
    out = {}
    for prompt, items in found.items():
        final = max(rank for rank, *_ in items)
        chosen = sorted((it for it in items if it[0] == final), key=lambda it: it[1])[:IMAGES_PER_SET]
        out[prompt] = PromptImages(category=chosen[0][4], stage=STAGE_ORDER[final],
                                   files=tuple(it[2] for it in chosen), paths=tuple(it[3] for it in chosen))
    return out


def left_side(seed: int, prompt: str) -> str:
    """Which directory ("A" or "B") is shown on the left for `prompt`: a fair coin drawn from
    sha256(seed, prompt), so it is the same for every rater and every run with this seed."""
    return "A" if hashlib.sha256(f"{seed}\n{prompt}".encode()).digest()[0] < 128 else "B"


@dataclass(frozen=True)
class Pair:
    """One prompt to rate: DIR_A's and DIR_B's sets, and which is on the left."""

    prompt: str
    category: str
    left: str  # "A" or "B"
    a: PromptImages
    b: PromptImages

    def screen(self) -> tuple[PromptImages, PromptImages]:
        """(left set, right set) as the page shows them."""
        return (self.a, self.b) if self.left == "A" else (self.b, self.a)

    def to_dir(self, screen_choice: str) -> str:
        """A screen answer (left / indifferent / right) as saved (A / indifferent / B)."""
        if screen_choice == "indifferent":
            return "indifferent"
        right = "B" if self.left == "A" else "A"
        return self.left if screen_choice == "left" else right


def pair_prompts(a: dict[str, PromptImages], b: dict[str, PromptImages], seed: int) -> list[Pair]:
    """The prompts both directories have, in DIR_A's order (category: DIR_A's)."""
    return [Pair(p, a[p].category, left_side(seed, p), a[p], b[p]) for p in a if p in b]


# -- the ratings directory ----------------------------------------------------------------------------


def _is_kiln_json(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(256)
    except OSError:
        return False
    return re.match(rb'\A\s*\{\s*"' + re.escape(JSON_MARKER_KEY.encode()) + rb'"\s*:', head) is not None


def check_ratings_dir(out: Path, flag: str = "--out", advice: str = "give a new or empty directory") -> bool:
    """Refuse a ratings directory that holds anything kiln rate did not write (a RatingError);
    True when it already is one (it has kiln's rate.json), False when it is new or empty."""
    if out.exists() and not out.is_dir():
        raise RatingError(f"{flag} {out} is a file: give a directory for the ratings")
    parent = next((p for p in out.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise RatingError(f"{flag} {out}: {parent} is a file, not a directory")
    if not out.exists():
        return False
    names = sorted(os.listdir(out))
    foreign = [n for n in names if n not in KILN_NAMES and not _TEMP_NAME.fullmatch(n)]
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise RatingError(f"{flag} {out} holds files kiln rate did not write ({shown}): {advice} "
                          "(kiln never deletes or overwrites your files)")
    names = [n for n in names if n in KILN_NAMES]  # a temp file alone: a first start that was killed
    if not names:
        return False
    unmarked = [n for n in KILN_NAMES if n in names and n != ANSWERS_NAME and not _is_kiln_json(out / n)]
    if SESSION_NAME not in names or unmarked:
        what = ", ".join(unmarked) or f"{', '.join(names)} without kiln's {SESSION_NAME}"
        raise RatingError(f"{flag} {out} holds {what}, not written by kiln rate: {advice} "
                          "(kiln never deletes or overwrites your files)")
    return True


def read_session(out: Path) -> dict:
    try:
        session = json.loads((out / SESSION_NAME).read_text(encoding="utf-8"))
        if session.get("format") != FORMAT:
            raise ValueError(f"format {session.get('format')!r}, not {FORMAT}")
        session["seed"] = int(session["seed"])
        session["dir_a"], session["dir_b"] = str(session["dir_a"]), str(session["dir_b"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise RatingError(f"{out / SESSION_NAME} is unreadable ({one_line(err)[:120]}): give another directory") from err
    return session


def session_seed(out: Path, dirs: tuple[Path, Path], seed: int | None) -> int:
    """The seed of the session in `out`: a previous run's (resumed), else `seed` (default 0). A
    session over other directories or with another seed is refused: its answers would not mean
    the same thing. Writes nothing."""
    if not check_ratings_dir(out):
        return 0 if seed is None else seed
    session = read_session(out)
    for key, flag, d in (("dir_a", "DIR_A", dirs[0]), ("dir_b", "DIR_B", dirs[1])):
        if session[key] != str(d):
            raise RatingError(f"--out {out} rates {flag} {session[key]}, not {d}: give the same directories to "
                              "resume, or another --out")
    if seed is not None and seed != session["seed"]:
        raise RatingError(f"--out {out} was started with --seed {session['seed']}: give that seed (or none) to "
                          "resume, or another --out")
    return session["seed"]


def write_session(out: Path, dirs: tuple[Path, Path], seed: int) -> None:
    """rate.json for a new session (an existing one is left as it is)."""
    out.mkdir(parents=True, exist_ok=True)
    if (out / SESSION_NAME).exists():
        return
    session = {JSON_MARKER_KEY: JSON_MARKER, "format": FORMAT, "dir_a": str(dirs[0]), "dir_b": str(dirs[1]),
               "seed": seed, "images_per_set": IMAGES_PER_SET, "created": _now()}
    atomic_write(out / SESSION_NAME, lambda tmp: tmp.write_text(json.dumps(session, indent=1) + "\n", encoding="utf-8"))
    _fsync_dir(out)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _valid_answer(record) -> bool:
    return (isinstance(record, dict) and isinstance(record.get("rater"), str) and record["rater"]
            and isinstance(record.get("prompt"), str) and isinstance(record.get("category"), str)
            and record.get("left") in ("A", "B") and record.get("quality") in CHOICES
            and record.get("caption") in CHOICES)


def read_answers(path: Path) -> tuple[list[dict], list[int]]:
    """(answers, numbers of the lines that are not answers) of an answers.jsonl; a line cut short by
    a crash (the last one) is such a line, not a failure."""
    records, bad = [], []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except ValueError:  # also UnicodeDecodeError
                record = None
            if _valid_answer(record):
                records.append(record)
            else:
                bad.append(number)
    return records, bad


class AnswerLog:
    """answers.jsonl, held open (and under an exclusive flock: one `kiln rate` per directory) while
    the page is served. Each answer is one line, written and fsynced before the page moves on."""

    def __init__(self, path: Path):
        self.path = path
        self.lock = threading.Lock()  # one append at a time; held at shutdown so none is cut off
        self.closed = False
        created = not path.exists()
        self._fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            raise RatingError(f"another `kiln rate` is serving {path.parent}: stop it first, or give another --out") from None
        if created:
            _fsync_dir(path.parent)
        records, self.bad_lines = read_answers(path)
        self.answered: dict[str, set[str]] = defaultdict(set)
        for r in records:
            self.answered[r["rater"]].add(r["prompt"])
        self.count = len(records)
        size = os.fstat(self._fd).st_size
        # a line cut short by a crash: the next answer starts on a line of its own
        self._newline_first = size > 0 and os.pread(self._fd, 1, size - 1) != b"\n"

    def answered_by(self, rater: str) -> set[str]:
        with self.lock:
            return set(self.answered.get(rater, ()))

    def append(self, record: dict) -> bool:
        """Save `record` durably; False (nothing written) when its rater already answered its prompt."""
        data = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        with self.lock:
            if self.closed:  # the command is stopping: its descriptor may already be another file's
                raise OSError(errno.ESHUTDOWN, "kiln rate is stopping")
            if record["prompt"] in self.answered.get(record["rater"], ()):
                return False
            if self._newline_first:
                data = b"\n" + data
            self._newline_first = True  # until the whole line is down
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view):]
            os.fsync(self._fd)
            self._newline_first = False
            self.answered[record["rater"]].add(record["prompt"])
            self.count += 1
            return True

    def close(self) -> None:
        """Close the file (call with `lock` held: an append waiting for it then fails cleanly)."""
        if not self.closed:
            self.closed = True
            os.close(self._fd)


# -- the page ------------------------------------------------------------------------------------------

_STYLE = """
body{font:16px/1.45 system-ui,sans-serif;margin:0;color:#111;background:#fafafa}
main{max-width:1280px;margin:0 auto;padding:1rem 1.5rem}
.status{color:#444;margin:0 0 .5rem}
h1{font-size:1.3rem;margin:.25rem 0 1rem}
.sets{display:grid;grid-template-columns:1fr 1fr;gap:2rem}
.sets h2{font-size:1.1rem;margin:0 0 .4rem}
.grid{display:grid;grid-template-columns:repeat(4,1fr);gap:4px}
.grid img{width:100%;height:auto;image-rendering:pixelated;background:#ddd}
fieldset{border:1px solid #aaa;border-radius:4px;margin:1rem 0;padding:.5rem 1rem}
legend{font-weight:600;padding:0 .25rem}
label{display:inline-block;margin-right:2rem;padding:.3rem 0;cursor:pointer}
input[type=text]{font:inherit;padding:.3rem;margin:0 .5rem}
button{font:inherit;padding:.5rem 1.25rem}
:focus-visible{outline:3px solid #1a5fb4;outline-offset:2px}
.error{color:#a40000;font-weight:600}
"""

# The only script: remember the rater id in this browser (the start page fills it in), and stop a
# double submit. Everything works without it.
_SCRIPT = """
(function () {
  var key = "kiln-rate-rater", form = document.querySelector("form[data-rater]"), field = document.getElementById("rater");
  try {
    if (form) localStorage.setItem(key, form.dataset.rater);
    if (field && !field.value) field.value = localStorage.getItem(key) || "";
  } catch (e) {}
  if (form) form.addEventListener("submit", function () { form.querySelector("button[type=submit]").disabled = true; });
})();
"""

_CSP = ("default-src 'none'; img-src 'self'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; "
        "form-action 'self'; base-uri 'none'; frame-ancestors 'none'")


def _e(text) -> str:
    return html.escape(str(text), quote=True)


def _document(title: str, body: str) -> str:
    return (f'<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{_e(title)} - kiln rate</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n<main>\n{body}\n"
            f"</main>\n<script>{_SCRIPT}</script>\n</body>\n</html>\n")


def _start_page(n_prompts: int, error: str = "") -> str:
    err = f'<p class="error" role="alert">{_e(error)}</p>\n' if error else ""
    return _document("Who is rating?", f"""<h1>Rate {n_prompts} prompts, side by side</h1>
{err}<p>Each prompt shows two sets of images made from the same caption. For each, say which set
is of higher quality, and which better represents the caption &mdash; or that you are indifferent.</p>
<form method="get" action="/">
<label for="rater">Your rater id (a name or initials; it keeps your place)</label>
<input type="text" id="rater" name="rater" required maxlength="{MAX_RATER_CHARS}" autocomplete="off">
<button type="submit">Start rating</button>
</form>""")


def _done_page(rater: str, n_prompts: int) -> str:
    return _document("All rated", f"""<p class="status">Rating as <strong>{_e(rater)}</strong>
(<a href="/?rater=">not you?</a>)</p>
<h1 id="done">All {n_prompts} prompts are rated. Thank you!</h1>
<p>Every answer is saved; you can close this page.</p>""")


def _pair_page(rater: str, index: int, n_done: int, n_prompts: int, pair: Pair, tokens, form_token: str) -> str:
    sets = []
    for side, title, ids in (("a", "Set A", tokens[0]), ("b", "Set B", tokens[1])):
        imgs = "\n".join(f'<img src="/img/{t}" alt="{title}, image {j + 1} of {len(ids)}">' for j, t in enumerate(ids))
        sets.append(f'<section aria-labelledby="set-{side}"><h2 id="set-{side}">{title}</h2>\n'
                    f'<div class="grid">\n{imgs}\n</div></section>')
    caption = f"\u201c{_e(pair.prompt)}\u201d"  # quotes in the text, so a screen reader says them too
    fields = []
    for name, question in QUESTIONS.items():
        legend = _e(question).replace(_e("{caption}"), caption)
        radios = "\n".join(f'<label><input type="radio" name="{name}" value="{value}" required> {_e(text)}</label>'
                           for value, text in SCREEN_CHOICES.items())
        fields.append(f'<fieldset id="q-{name}"><legend>{legend}</legend>\n{radios}\n</fieldset>')
    return _document(f"Prompt {index + 1} of {n_prompts}", f"""<p class="status" id="progress">Prompt {index + 1}
of {n_prompts} ({n_done} rated) &middot; rating as <strong>{_e(rater)}</strong> (<a href="/?rater=">not you?</a>)</p>
<h1>Caption: <span id="caption">{_e(pair.prompt)}</span></h1>
<div class="sets">
{sets[0]}
{sets[1]}
</div>
<form method="post" action="/answer" data-rater="{_e(rater)}">
<input type="hidden" name="token" value="{_e(form_token)}">
<input type="hidden" name="rater" value="{_e(rater)}">
<input type="hidden" name="prompt" value="{_e(pair.prompt)}">
{fields[0]}
{fields[1]}
<button type="submit">Save and go to the next prompt</button>
</form>""")


def _message_page(title: str, message: str) -> str:
    return _document(title, f'<h1>{_e(title)}</h1>\n<p role="alert">{_e(message)}</p>\n<p><a href="/">Back to rating</a></p>')


def _valid_rater(rater: str) -> str | None:
    """Why `rater` cannot be a rater id, or None."""
    if not rater:
        return "give a rater id"
    if len(rater) > MAX_RATER_CHARS:
        return f"a rater id has at most {MAX_RATER_CHARS} characters"
    if not rater.isprintable():
        return "a rater id has no control characters"
    return None


class RatingServer(ThreadingHTTPServer):
    """The rating page for `pairs`, on 127.0.0.1; answers go to `log`."""

    daemon_threads = True  # an open connection never keeps the command alive; appends hold log.lock

    def __init__(self, pairs: list[Pair], dirs: tuple[Path, Path], port: int = 0, rater: str | None = None,
                 log: AnswerLog | None = None):
        self.pairs = pairs
        self.by_prompt = {p.prompt: p for p in pairs}
        self.log = log  # set before serving
        self.dirs = dirs
        self.default_rater = rater
        self.form_token = secrets.token_urlsafe(18)  # a page from this run, not a form elsewhere posting here
        self.files: list[Path] = []  # /img/<k> -> the k-th file; the only files ever served
        self.tokens: dict[str, tuple[list[int], list[int]]] = {}  # prompt -> (left ids, right ids)
        for pair in pairs:
            ids = []
            for images in pair.screen():
                ids.append(list(range(len(self.files), len(self.files) + len(images.files))))
                self.files.extend(images.files)
            self.tokens[pair.prompt] = (ids[0], ids[1])
        super().__init__(("127.0.0.1", port), _Handler)
        self.port = self.server_address[1]
        self.hosts = {f"127.0.0.1:{self.port}", f"localhost:{self.port}"}
        self.url = f"http://127.0.0.1:{self.port}/"

    def page(self, rater: str) -> str:
        done = self.log.answered_by(rater)
        for i, pair in enumerate(self.pairs):
            if pair.prompt not in done:
                n_done = sum(p.prompt in done for p in self.pairs)
                return _pair_page(rater, i, n_done, len(self.pairs), pair, self.tokens[pair.prompt], self.form_token)
        return _done_page(rater, len(self.pairs))

    def record(self, rater: str, pair: Pair, quality: str, caption: str) -> dict:
        return {"rater": rater, "prompt": pair.prompt, "category": pair.category, "left": pair.left,
                "left_dir": str(self.dirs[0] if pair.left == "A" else self.dirs[1]),
                "quality": pair.to_dir(quality), "caption": pair.to_dir(caption),
                "stage_a": pair.a.stage, "stage_b": pair.b.stage,
                "images_a": list(pair.a.paths), "images_b": list(pair.b.paths), "time": _now()}


class _Handler(BaseHTTPRequestHandler):
    server: RatingServer
    server_version = "kiln-rate"
    timeout = IDLE_CONNECTION_S

    def log_message(self, format, *args):  # noqa: A002 - http.server's signature; quiet: one line per command
        pass

    def _send(self, status: int, body: bytes, content_type: str, headers: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "same-origin")  # no-referrer would make the form's Origin "null"
        if content_type.startswith("text/html"):
            self.send_header("Content-Security-Policy", _CSP)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _html(self, status: int, page: str) -> None:
        self._send(status, page.encode("utf-8"), "text/html; charset=utf-8")

    def _fail(self, status: HTTPStatus, message: str) -> None:
        self._html(status, _message_page(status.phrase, message))

    def _host_ok(self) -> bool:
        """Only requests addressed to this server by its loopback name (no DNS rebinding)."""
        if self.headers.get("Host", "") in self.server.hosts:
            return True
        self._fail(HTTPStatus.FORBIDDEN, f"kiln rate answers at {self.server.url} only")
        return False

    def do_GET(self):  # noqa: N802 - http.server's name
        if not self._host_ok():
            return
        url = urlsplit(self.path)
        if url.path == "/":
            return self._rating_page(parse_qs(url.query, keep_blank_values=True))
        if url.path.startswith("/img/"):
            return self._image(url.path[len("/img/"):])
        self._fail(HTTPStatus.NOT_FOUND, "no such page")

    def _rating_page(self, query: dict) -> None:
        if "rater" in query:
            rater = query["rater"][0].strip()
        else:
            rater = self.server.default_rater or ""
        if not rater:
            return self._html(HTTPStatus.OK, _start_page(len(self.server.pairs)))
        problem = _valid_rater(rater)
        if problem:
            return self._html(HTTPStatus.BAD_REQUEST, _start_page(len(self.server.pairs), problem))
        self._html(HTTPStatus.OK, self.server.page(rater))

    def _image(self, token: str) -> None:
        files = self.server.files
        if not (token.isascii() and token.isdigit() and len(token) <= 9 and int(token) < len(files)):
            return self._fail(HTTPStatus.NOT_FOUND, "no such image")
        file = files[int(token)]
        try:
            data = file.read_bytes()
        except OSError:
            return self._fail(HTTPStatus.NOT_FOUND, "that image is gone from its directory")
        self._send(HTTPStatus.OK, data, IMAGE_TYPES[file.suffix.lower()])

    def do_POST(self):  # noqa: N802
        if not self._host_ok():
            return
        if urlsplit(self.path).path != "/answer":
            return self._fail(HTTPStatus.NOT_FOUND, "no such page")
        origin = self.headers.get("Origin")
        if origin is not None and origin.removeprefix("http://") not in self.server.hosts:
            return self._fail(HTTPStatus.FORBIDDEN, "answers come from the rating page only")
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            return self._fail(HTTPStatus.LENGTH_REQUIRED, "the form has no length")
        if not 0 <= length <= MAX_FORM_BYTES:
            return self._fail(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "the form is too large")
        if not self.headers.get("Content-Type", "").startswith("application/x-www-form-urlencoded"):
            return self._fail(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "send the rating form")
        try:
            form = parse_qs(self.rfile.read(length).decode("utf-8"), keep_blank_values=True, strict_parsing=True,
                            max_num_fields=16)
        except ValueError:  # not UTF-8, not a form, too many fields
            return self._fail(HTTPStatus.BAD_REQUEST, "the form could not be read")
        self._answer({k: v[0] if len(v) == 1 else None for k, v in form.items()})

    def _answer(self, form: dict) -> None:
        server = self.server
        if not secrets.compare_digest((form.get("token") or "").encode(), server.form_token.encode()):
            return self._fail(HTTPStatus.FORBIDDEN, "this page is from an earlier run of kiln rate: reload it, "
                                                    "then answer again")
        rater = (form.get("rater") or "").strip()
        pair = server.by_prompt.get(form.get("prompt") or "")
        if _valid_rater(rater) or pair is None:
            return self._fail(HTTPStatus.BAD_REQUEST, "the form names no rater or no prompt of this session")
        quality, caption = form.get("quality"), form.get("caption")
        if quality not in SCREEN_CHOICES or caption not in SCREEN_CHOICES:
            return self._fail(HTTPStatus.BAD_REQUEST, "answer both questions")
        try:
            server.log.append(server.record(rater, pair, quality, caption))  # False: answered before; go on
        except OSError as err:
            return self._fail(HTTPStatus.INTERNAL_SERVER_ERROR,
                              f"the answer may not have been saved ({err.strerror or err}): reload and answer again")
        self._send(HTTPStatus.SEE_OTHER, b"saved\n", "text/plain; charset=utf-8",
                   {"Location": f"/?rater={quote(rater, safe='')}"})


def make_server(pairs: list[Pair], dirs: tuple[Path, Path], port: int = 0, rater: str | None = None,
                log: AnswerLog | None = None) -> RatingServer:
    """The rating page's server, bound to 127.0.0.1:`port` (0: a free port); a port that cannot be
    bound is a RatingError."""
    try:
        return RatingServer(pairs, dirs, port, rater, log)
    except OSError as err:
        raise RatingError(f"--port {port}: cannot listen on 127.0.0.1:{port} ({err.strerror or err}): give another "
                          "port, or 0 for a free one") from err


# -- the summary ---------------------------------------------------------------------------------------


def wilson_interval(k: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Wilson score interval for a proportion k/n (Wilson 1927): stays inside [0, 1] and keeps its
    coverage at small n and at rates near 0 or 1, where the normal approximation does not; no
    resampling, so the summary is the same on every run."""
    if n <= 0:
        return 0.0, 1.0
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def _cell(answers: list[str]) -> dict:
    n = len(answers)
    out = {"n": n}
    for choice in CHOICES:
        k = answers.count(choice)
        low, high = wilson_interval(k, n)
        out[choice] = {"count": k, "rate": k / n if n else 0.0, "low": low, "high": high}
    return out


def summarise(records: list[dict]) -> dict:
    """Per question, overall and per category: {n, A, indifferent, B: {count, rate, low, high}}.
    A rater's second answer to the same prompt (only a hand-edited file has one) is not counted."""
    seen, kept = set(), []
    for r in records:
        if (r["rater"], r["prompt"]) not in seen:
            seen.add((r["rater"], r["prompt"]))
            kept.append(r)
    categories = sorted({r["category"] for r in kept})
    questions = {}
    for q, text in QUESTIONS.items():
        questions[q] = {"question": text,
                        "overall": _cell([r[q] for r in kept]),
                        "categories": {c: _cell([r[q] for r in kept if r["category"] == c]) for c in categories}}
    return {"answers": len(kept), "duplicates_ignored": len(records) - len(kept),
            "raters": sorted({r["rater"] for r in kept}), "prompts": len({r["prompt"] for r in kept}),
            "interval": f"{CONFIDENCE:.0%} Wilson score", "questions": questions}


def _format_summary(summary: dict, out: Path) -> str:
    def pct(c):
        return f"{c['rate']:6.1%} [{c['low']:.1%}, {c['high']:.1%}]"

    width = max([len("all categories")] + [len(c) for c in summary["questions"]["quality"]["categories"]])
    n_raters = len(summary["raters"])
    lines = [f"kiln rate --summary {out}: {summary['answers']} answers from {n_raters} rater{'s' * (n_raters != 1)} "
             f"on {summary['prompts']} prompts",
             f"A = {summary['dir_a']}", f"B = {summary['dir_b']}",
             f"share of answers, with {summary['interval']} intervals (each answer counted as independent)"]
    if summary["duplicates_ignored"]:
        lines.append(f"{summary['duplicates_ignored']} repeated answers (same rater, same prompt) not counted")
    if summary["skipped_lines"]:
        lines.append(f"unreadable lines of {ANSWERS_NAME} skipped: {len(summary['skipped_lines'])} "
                     f"(line {', '.join(map(str, summary['skipped_lines'][:5]))})")
    for q, result in summary["questions"].items():
        lines += ["", f"{q}: {result['question'].format(caption='<caption>')}",
                  f"  {'category':<{width}} {'n':>5}  {'prefer A':<24} {'indifferent':<24} {'prefer B':<24}"]
        rows = [("all categories", result["overall"]), *result["categories"].items()]
        for name, c in rows:
            lines.append(f"  {name:<{width}} {c['n']:>5}  {pct(c['A']):<24} {pct(c['indifferent']):<24} {pct(c['B']):<24}")
    return "\n".join(line.rstrip() for line in lines)


def main_summary(out: Path) -> int:
    """`kiln rate --summary DIR`: print the tally of DIR/answers.jsonl and write DIR/summary.json."""
    if not out.is_dir():
        raise MissingFile(f"--summary {out}: no such directory: give the --out of a `kiln rate` run")
    if not check_ratings_dir(out, "--summary", advice="give the --out of a `kiln rate` run"):
        raise RatingError(f"--summary {out} holds no ratings: rate first with `kiln rate DIR_A DIR_B --out {out}`")
    session = read_session(out)
    answers = out / ANSWERS_NAME
    records, bad = read_answers(answers) if answers.is_file() else ([], [])
    if not records:
        raise RatingError(f"--summary {out}: no answers in {ANSWERS_NAME} yet: rate some with "
                          f"`kiln rate {session['dir_a']} {session['dir_b']} --out {out}`")
    summary = {JSON_MARKER_KEY: JSON_MARKER, "format": FORMAT, "dir_a": session["dir_a"], "dir_b": session["dir_b"],
               "seed": session["seed"], **summarise(records), "skipped_lines": bad, "created": _now()}
    print(_format_summary(summary, out))
    path = atomic_write(out / SUMMARY_NAME,
                        lambda tmp: tmp.write_text(json.dumps(summary, indent=1, ensure_ascii=False) + "\n",
                                                   encoding="utf-8"))
    print(f"\nwrote {path}")
    return 0


# -- the command ---------------------------------------------------------------------------------------


def add_rate_args(p: argparse.ArgumentParser) -> None:
    p.usage = "kiln rate DIR_A DIR_B --out DIR [--rater NAME] [--port N] [--seed S]\n       kiln rate --summary DIR"
    p.description = ("Serve a page on 127.0.0.1 where people compare two `kiln sample --out-dir` directories "
                     "prompt by prompt (Imagen's side-by-side protocol); answers are saved to DIR/answers.jsonl as "
                     "they are given. `--summary DIR` prints the preference rates with 95% Wilson intervals and "
                     "writes DIR/summary.json.")
    p.add_argument("dirs", nargs="*", metavar="DIR_A DIR_B", help="the two sample directories (samples.parquet + images)")
    p.add_argument("--out", default=None, metavar="DIR", help="where the answers go (new, empty, or a previous run's to resume)")
    p.add_argument("--rater", default=None, metavar="NAME", help="the rater's id (else the page asks for one)")
    p.add_argument("--port", type=int, default=0, help="port on 127.0.0.1; 0 picks a free one [0]")
    p.add_argument("--seed", type=int, default=None,
                   help="seed of which side each directory is shown on [0; a resumed run keeps its own]")
    p.add_argument("--summary", default=None, metavar="DIR", help="summarise the answers in DIR instead of serving")


def main_rate(args: argparse.Namespace) -> int:
    """`kiln rate` (add_rate_args). A bad input raises a UserError before anything is written."""
    if args.summary is not None:
        if args.dirs or args.out is not None:
            raise RatingError("--summary DIR takes no sample directories and no --out: `kiln rate --summary DIR`")
        return main_summary(Path(args.summary))
    if len(args.dirs) != 2:
        raise RatingError(f"give two sample directories, not {len(args.dirs)}: `kiln rate DIR_A DIR_B --out DIR`")
    if args.out is None:
        raise RatingError("give --out DIR, where the answers go: `kiln rate DIR_A DIR_B --out DIR`")
    if not 0 <= args.port <= 65535:
        raise RatingError(f"--port takes 0 to 65535, got {args.port}")
    if args.rater is not None and _valid_rater(args.rater.strip()):
        raise RatingError(f"--rater {args.rater!r}: {_valid_rater(args.rater.strip())}")
    dir_a, dir_b, out = Path(args.dirs[0]), Path(args.dirs[1]), Path(args.out)
    check_ratings_dir(out)
    a, b = load_samples(dir_a, "DIR_A"), load_samples(dir_b, "DIR_B")
    if not any(p in b for p in a):
        raise RatingError(f"no prompt is in both DIR_A {dir_a} ({len(a)} prompts) and DIR_B {dir_b} ({len(b)}): "
                          "sample both with the same prompts")
    dirs = (dir_a.resolve(), dir_b.resolve())
    seed = session_seed(out, dirs, args.seed)
    pairs = pair_prompts(a, b, seed)
    server = make_server(pairs, dirs, args.port, args.rater.strip() if args.rater else None)  # before any write
    try:
        write_session(out, dirs, seed)
        log = server.log = AnswerLog(out / ANSWERS_NAME)
    except BaseException:
        server.server_close()
        raise
    print(f"kiln rate: {len(pairs)} prompts in both directories (DIR_A {len(a)}, DIR_B {len(b)}); "
          f"{log.count} answers so far in {log.path}", flush=True)
    print(f"kiln rate: open {server.url} in a browser to rate; Ctrl-C stops", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: how the page is meant to be stopped
        pass
    finally:
        server.server_close()
        with log.lock:  # wait for an answer being written; none starts after this
            log.close()
            print(f"\nkiln rate: stopped; {log.count} answers in {log.path}; tally them with "
                  f"`kiln rate --summary {out}`", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.rate")
    add_rate_args(p)
    return run_command("kiln rate", main_rate, p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
