"""train/rate.py: `kiln rate`, the side-by-side rating page (Imagen's DrawBench protocol, §3), and its summary.

Sample directories are written here in `kiln sample --out-dir`'s layout (samples.parquet + PNGs):
DIR_A's final-stage images are red, DIR_B's blue, and every base-stage image green, so a test
(and the browser, through a canvas) can tell from the pixels which directory a shown image came
from and that only the final stage is shown.

    unit        loading a directory, pairing prompts and drawing sides, the Wilson interval, the
                summary's counts, answers.jsonl's durability rules, the HTTP server (only listed files,
                loopback only, a form from this page only, an answer saved once)
    bad inputs  `python -m pipeline.cli rate ...` as a subprocess: one line, exit 2, no traceback,
                the user's files untouched
    browser     Debian's chromium driven by selenium through /usr/bin/chromedriver (no Selenium
                Manager, no network): answer two prompts (one by keyboard only), reload, restart
                the server, check it resumes at the third, answer the rest, check answers.jsonl and
                `kiln rate --summary`. Skipped when chromium is missing -- except under CI (CI=1, set
                by .ci/run, which installs it), where it fails.
"""

from __future__ import annotations

import hashlib
import http.client
import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from urllib.parse import urlencode

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from train.errors import UserError
from train.rate import (
    IMAGES_PER_SET,
    STAGE_ORDER,
    AnswerLog,
    RatingError,
    left_side,
    load_samples,
    make_server,
    pair_prompts,
    read_answers,
    summarise,
    wilson_interval,
)

REPO = Path(__file__).resolve().parents[2]
RED, BLUE, GREEN = (200, 30, 30), (30, 30, 200), (30, 200, 30)
# (prompt, category) in both directories, in DIR_A's order: the page's order
PROMPTS = [("a red cube on a table", "colours"), ("two cats", "counting"), ("a blue bird", "colours"),
           ("three apples", "counting")]


def write_sample_dir(root: Path, prompts, colour, *, n_final: int = 10, n_base: int = 8, final: str = "sr256",
                     extra_rows=(), complete: bool | None = True) -> Path:
    """A `kiln sample --out-dir` directory (train.sample's layout: STAGE/PPPPPP-SSS.png, seed + k for
    sample k, footer kiln.samples saying whether the run finished; `complete=None`: no footer, as a
    hand-made listing of another model's images has none): per prompt n_base green base images and
    n_final `colour` images of stage `final`, listed in a shuffled order."""
    rows = []
    for i, (prompt, category) in enumerate(prompts):
        for stage, n, fill in (("base", n_base, GREEN), (final, n_final, colour)):
            (root / stage).mkdir(parents=True, exist_ok=True)
            for k in sorted(range(n), key=lambda k: (k * 7) % n):  # not in sample order
                rel = f"{stage}/{i:06d}-{k:03d}.png"
                Image.new("RGB", (16, 16), fill).save(root / rel)
                rows.append({"prompt_index": i, "sample_index": k, "prompt": prompt, "category": category,
                             "seed": 100 + k, "stage": stage, "guidance": 5.0, "sampler": "ddpm",
                             "checkpoint_step": 7, "path": rel})
    rows.extend(extra_rows)
    table = pa.Table.from_pylist(rows)
    if complete is not None:
        footer = {"format": "kiln-samples/1", "complete": complete, "stages": [{"stage": "base"}, {"stage": final}]}
        table = table.replace_schema_metadata({b"kiln.samples": json.dumps(footer).encode()})
    pq.write_table(table, root / "samples.parquet")
    return root


@pytest.fixture
def dirs(tmp_path):
    """(DIR_A, DIR_B): four prompts in common; one prompt each that the other lacks."""
    a = write_sample_dir(tmp_path / "a", PROMPTS + [("only in a", "colours")], RED)
    b = write_sample_dir(tmp_path / "b", [("only in b", "colours")] + PROMPTS[::-1], BLUE)
    return a, b


def kiln(*argv, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {**os.environ}
    env.pop("KILN_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *map(str, argv)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(proc: subprocess.CompletedProcess, *words: str, code: int = 2) -> str:
    """exit `code`, stderr one line `kiln rate: error: ...` holding `words`, no traceback."""
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("kiln rate: error: "), lines[0]
    for w in words:
        assert w in lines[0], (w, lines[0])
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    return lines[0]


def snapshot(root: Path) -> dict:
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


class Server:
    """`kiln rate ...` as a subprocess; `url` from the line it prints. Use through the `servers`
    fixture, which kills any left running when a test fails."""

    def __init__(self, *argv):
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("KILN_DEBUG", None)
        self.proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "rate", *map(str, argv)], cwd=REPO,
                                     env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines = []
        while not self.lines or "open http" not in self.lines[-1]:
            line = self.proc.stdout.readline()
            if not line:
                self.proc.kill()
                raise AssertionError(f"kiln rate stopped: {self.proc.wait()} {self.proc.stderr.read()}")
            self.lines.append(line)
        self.url = re.search(r"http://127\.0\.0\.1:\d+/", self.lines[-1]).group(0)

    def stop(self) -> str:
        """Ctrl-C, as a person stops it: exit 0, no traceback; returns what it printed."""
        self.proc.send_signal(signal.SIGINT)
        out, err = self.proc.communicate(timeout=30)
        assert self.proc.returncode == 0, err
        assert "Traceback" not in err, err
        return out


@pytest.fixture
def servers():
    started = []

    def start(*argv) -> Server:
        started.append(Server(*argv))
        return started[-1]

    yield start
    for server in started:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait()


# -- loading and pairing -----------------------------------------------------------------------------


def test_reads_what_kiln_sample_writes(tmp_path):
    """The contract with train.sample (not imported by train.rate: it loads torch): its stage names,
    its footer, its schema; a directory its reader accepts, this one reads the same way."""
    import train.rate as rate
    from train import sample

    assert STAGE_ORDER == sample.STAGE_NAMES and rate.SAMPLES_FOOTER_KEY == sample.SAMPLES_FOOTER_KEY
    rows = []
    for k in (1, 0):
        for stage in ("base", "sr256"):
            rel = f"{stage}/000000-{k:03d}.png"
            (tmp_path / stage).mkdir(exist_ok=True)
            Image.new("RGB", (8, 8), RED).save(tmp_path / rel)
            rows.append({"prompt_index": 0, "sample_index": k, "prompt": "a red cube", "category": None, "seed": k,
                         "stage": stage, "width": 8, "height": 8, "guidance": 5.0, "steps": 4, "sampler": "ddpm",
                         "checkpoint": "x.safetensors", "checkpoint_step": 7, "path": rel})
    info = {"format": sample.SAMPLES_FORMAT, "complete": True, "stages": [{"stage": "base"}, {"stage": "sr256"}]}
    table = pa.Table.from_pylist(rows, schema=sample.SAMPLES_SCHEMA)
    pq.write_table(table.replace_schema_metadata({sample.SAMPLES_FOOTER_KEY: json.dumps(info).encode()}),
                   tmp_path / "samples.parquet")
    theirs = sample.read_sample_dir(tmp_path)
    ours = load_samples(tmp_path, "DIR_A")["a red cube"]
    assert list(ours.paths) == [r["path"] for r in sorted(theirs.stage_rows(), key=lambda r: r["sample_index"])]
    assert (ours.stage, ours.category) == ("sr256", "(none)")


def test_a_set_is_the_final_stages_first_8_by_seed(dirs):
    a, _ = dirs
    loaded = load_samples(a, "DIR_A")
    assert list(loaded) == [p for p, _ in PROMPTS] + ["only in a"]  # samples.parquet's order
    s = loaded["two cats"]
    assert (s.stage, s.category, len(s.files)) == ("sr256", "counting", IMAGES_PER_SET)
    assert list(s.paths) == [f"sr256/000001-{k:03d}.png" for k in range(IMAGES_PER_SET)]
    assert all(f.is_absolute() and f.is_relative_to(a.resolve()) for f in s.files)
    # a directory sampled through sr1024: that stage is the final one, whatever else is listed;
    # without kiln's footer (a hand-made listing), and without sample_index: by seed
    c = write_sample_dir(a.parent / "c", PROMPTS[:1], BLUE, n_final=3, final="sr1024", complete=None)
    pq.write_table(pq.read_table(c / "samples.parquet").drop_columns(["sample_index"]), c / "samples.parquet")
    assert load_samples(c, "DIR_B")[PROMPTS[0][0]].stage == "sr1024"
    assert len(load_samples(c, "DIR_B")[PROMPTS[0][0]].files) == 3  # up to 8


def test_pairs_are_the_common_prompts_with_a_seeded_side_each(dirs):
    a, b = (load_samples(d, name) for d, name in zip(dirs, ("DIR_A", "DIR_B")))
    pairs = pair_prompts(a, b, seed=3)
    assert [(p.prompt, p.category) for p in pairs] == PROMPTS
    for p in pairs:
        assert p.left == left_side(3, p.prompt)
        left, right = p.screen()
        assert (left is p.a) == (p.left == "A") and (right is p.b) == (p.left == "A")
        other = "B" if p.left == "A" else "A"
        assert (p.to_dir("left"), p.to_dir("right"), p.to_dir("indifferent")) == (p.left, other, "indifferent")
    # a fair coin per prompt, fixed by the seed
    sides = [left_side(0, f"prompt {i}") for i in range(400)]
    assert 0.42 < sides.count("A") / len(sides) < 0.58
    assert sides == [left_side(0, f"prompt {i}") for i in range(400)]
    assert sides != [left_side(1, f"prompt {i}") for i in range(400)]


# -- the summary -------------------------------------------------------------------------------------


def test_wilson_interval():
    # 95% Wilson score intervals as published: Newcombe (1998), Stat. Med. 17:857-872, method 3, worked examples
    assert wilson_interval(81, 263) == pytest.approx((0.2553, 0.3662), abs=1e-4)
    assert wilson_interval(15, 148) == pytest.approx((0.0624, 0.1605), abs=1e-4)
    assert wilson_interval(0, 20) == pytest.approx((0.0, 0.1611), abs=1e-4)
    assert wilson_interval(1, 29) == pytest.approx((0.0061, 0.1718), abs=1e-4)
    assert wilson_interval(4, 4) == pytest.approx((0.5101, 1.0), abs=1e-4)
    low, high = wilson_interval(30, 100)
    assert low < 0.3 < high and high - low < wilson_interval(3, 10)[1] - wilson_interval(3, 10)[0]


def test_summary_counts_per_category_and_overall():
    def r(rater, prompt, category, quality, caption):
        return {"rater": rater, "prompt": prompt, "category": category, "left": "A", "quality": quality,
                "caption": caption}

    records = [r("ann", "p1", "colours", "A", "B"), r("ann", "p2", "colours", "A", "indifferent"),
               r("ann", "p3", "counting", "B", "B"), r("bob", "p1", "colours", "indifferent", "A"),
               r("ann", "p1", "colours", "B", "B")]  # ann again on p1: not counted
    s = summarise(records)
    assert (s["answers"], s["duplicates_ignored"], s["raters"], s["prompts"]) == (4, 1, ["ann", "bob"], 3)
    q = s["questions"]["quality"]
    assert q["overall"]["n"] == 4
    assert [q["overall"][c]["count"] for c in ("A", "indifferent", "B")] == [2, 1, 1]
    assert q["overall"]["A"]["rate"] == 0.5
    assert (q["overall"]["A"]["low"], q["overall"]["A"]["high"]) == wilson_interval(2, 4)
    assert [q["categories"]["colours"][c]["count"] for c in ("A", "indifferent", "B")] == [2, 1, 0]
    assert [q["categories"]["counting"][c]["count"] for c in ("A", "indifferent", "B")] == [0, 0, 1]
    c = s["questions"]["caption"]
    assert [c["overall"][k]["count"] for k in ("A", "indifferent", "B")] == [1, 1, 2]
    assert c["question"].startswith("Which set of images better represents the text caption")


# -- answers.jsonl -----------------------------------------------------------------------------------


def test_answer_log_appends_once_after_a_torn_line_and_is_held_by_one_server(tmp_path):
    path = tmp_path / "answers.jsonl"
    good = {"rater": "ann", "prompt": "p1", "category": "c", "left": "B", "quality": "A", "caption": "B"}
    path.write_text(json.dumps(good) + "\n" + '{"rater": "ann", "prom')  # a crash mid-line
    log = AnswerLog(path)
    try:
        assert (log.count, log.bad_lines, log.answered_by("ann")) == (1, [2], {"p1"})
        with pytest.raises(RatingError, match="another `kiln rate` is serving"):
            AnswerLog(path)  # flock: a second server on the same directory
        assert log.append({**good, "prompt": "p2"}) is True
        assert log.append({**good, "prompt": "p2", "quality": "B"}) is False  # answered already: not saved
    finally:
        log.close()
    records, bad = read_answers(path)
    assert [r["prompt"] for r in records] == ["p1", "p2"] and records[1]["quality"] == "A"
    assert bad == [2]  # the torn line stays on a line of its own; the new answer is whole


# -- the server, over HTTP -------------------------------------------------------------------------


def test_server_serves_only_listed_files_on_loopback_and_saves_an_answer_once(dirs, tmp_path):
    import threading

    a, b = dirs
    pairs = pair_prompts(load_samples(a, "DIR_A"), load_samples(b, "DIR_B"), seed=0)
    (tmp_path / "r").mkdir()
    log = AnswerLog(tmp_path / "r" / "answers.jsonl")
    server = make_server(pairs, (a.resolve(), b.resolve()), log=log)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    host, port = server.server_address
    assert host == "127.0.0.1"

    def request(method, path, body=None, headers=None):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
        conn.close()
        return resp.status, resp.getheader("Location"), data

    try:
        status, _, page = request("GET", "/?rater=ann")
        assert status == 200
        ids = [int(i) for i in re.findall(rb'src="/img/(\d+)"', page)]
        assert len(ids) == 2 * IMAGES_PER_SET
        left_expected = pairs[0].screen()[0].files[0]
        assert request("GET", f"/img/{ids[0]}")[2] == left_expected.read_bytes()
        for bad in ("/img/../samples.parquet", "/img/%2e%2e/samples.parquet", f"/img/{len(server.files)}",
                    "/img/-1", "/img/1.0", "/img/%D9%A1", "/samples.parquet", "/sr256/000_00.png", "/../../etc/passwd",
                    "//etc/passwd"):
            assert request("GET", bad)[0] == 404, bad
        assert request("GET", "/", headers={"Host": f"attacker.example:{port}"})[0] == 403  # DNS rebinding

        token = re.search(rb'name="token" value="([^"]+)"', page).group(1).decode()
        form = {"token": token, "rater": "ann", "prompt": pairs[0].prompt, "quality": "left", "caption": "right"}
        urlform = {"Content-Type": "application/x-www-form-urlencoded"}
        assert request("POST", "/answer", urlencode({**form, "token": "stale"}), urlform)[0] == 403
        assert request("POST", "/answer", urlencode(form), {**urlform, "Origin": "http://evil.example"})[0] == 403
        assert request("POST", "/answer", urlencode({**form, "quality": "both"}), urlform)[0] == 400
        assert request("POST", "/answer", urlencode({**form, "prompt": "not a prompt"}), urlform)[0] == 400
        assert log.count == 0
        status, location, _ = request("POST", "/answer", urlencode(form), urlform)
        assert (status, location) == (303, "/?rater=ann")
        assert request("POST", "/answer", urlencode({**form, "quality": "right"}), urlform)[0] == 303  # again
        records, _ = read_answers(log.path)
        assert len(records) == 1
        rec, pair = records[0], pairs[0]
        assert (rec["left"], rec["quality"], rec["caption"]) == (pair.left, pair.to_dir("left"), pair.to_dir("right"))
        assert rec["left_dir"] == str((a if pair.left == "A" else b).resolve())
        assert rec["images_a"] == list(pair.a.paths) and rec["stage_b"] == "sr256"
        status, _, page = request("GET", "/?rater=ann")
        assert pairs[1].prompt.encode() in page and b"Prompt 2" in page
    finally:
        server.shutdown()
        server.server_close()
        log.close()


# -- bad inputs, through the CLI ---------------------------------------------------------------------


def test_bad_inputs_are_one_line_and_leave_the_users_files(dirs, tmp_path, servers):
    a, b = dirs
    out = tmp_path / "ratings"
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = kiln("rate", empty, b, "--out", out)
    assert_one_line_error(proc, "DIR_A", "has no samples.parquet", "kiln sample --out-dir")
    assert not out.exists()

    other = write_sample_dir(tmp_path / "other", [("something else", "x")], BLUE)
    assert_one_line_error(kiln("rate", a, other, "--out", out), "no prompt is in both")
    assert not out.exists()

    users = tmp_path / "mine"
    users.mkdir()
    (users / "notes.txt").write_text("my notes")
    (users / "answers.jsonl").write_text("my own answers\n")
    before = snapshot(users)
    assert_one_line_error(kiln("rate", a, b, "--out", users), "holds files kiln rate did not write", "notes.txt")
    assert_one_line_error(kiln("rate", "--summary", users), "notes.txt")
    (users / "notes.txt").unlink()
    del before[users / "notes.txt"]
    assert_one_line_error(kiln("rate", a, b, "--out", users), "answers.jsonl", "not written by kiln rate")
    assert snapshot(users) == before

    (tmp_path / "afile").write_text("x")
    assert_one_line_error(kiln("rate", a, b, "--out", tmp_path / "afile"), "is a file")

    sneaky = write_sample_dir(tmp_path / "sneaky", PROMPTS[:1], BLUE, extra_rows=[
        {"prompt_index": 0, "sample_index": 99, "prompt": PROMPTS[0][0], "category": "c", "seed": 99, "stage": "sr256",
         "guidance": 5.0, "sampler": "ddpm", "checkpoint_step": 7, "path": "../a/samples.parquet"}])
    assert_one_line_error(kiln("rate", a, sneaky, "--out", out), "points outside")
    (sneaky / "sr256" / "000000-003.png").unlink()
    pq.write_table(pq.read_table(sneaky / "samples.parquet").slice(0, 18), sneaky / "samples.parquet")
    assert_one_line_error(kiln("rate", a, sneaky, "--out", out), "sr256/000000-003.png does not exist")
    unfinished = write_sample_dir(tmp_path / "unfinished", PROMPTS, BLUE, complete=False)
    assert_one_line_error(kiln("rate", a, unfinished, "--out", out), "DIR_B", "interrupted `kiln sample` run")
    assert not out.exists()

    assert_one_line_error(kiln("rate", a, "--out", out), "give two sample directories")
    assert_one_line_error(kiln("rate", "--summary", tmp_path / "nowhere"), "no such directory")
    assert_one_line_error(kiln("rate", "--summary", empty), "holds no ratings")

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert_one_line_error(kiln("rate", a, b, "--out", out, "--port", port), f"--port {port}: cannot listen")
    assert not out.exists()  # the port is taken before anything is written

    servers(a, b, "--out", out, "--seed", 5).stop()  # a session with no answers
    assert_one_line_error(kiln("rate", "--summary", out), "no answers")
    assert_one_line_error(kiln("rate", b, a, "--out", out), "give the same directories to resume")
    assert_one_line_error(kiln("rate", a, b, "--out", out, "--seed", 6), "was started with --seed 5")
    assert sorted(os.listdir(out)) == ["answers.jsonl", "rate.json"]


def test_errors_are_user_errors(tmp_path):
    assert issubclass(RatingError, UserError)
    with pytest.raises(UserError, match="has no samples.parquet"):
        load_samples(tmp_path, "DIR_A")


# -- in a real browser -------------------------------------------------------------------------------

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def _browser_missing(reason: str):
    """Skip -- or, under CI (CI set by .ci/run, which installs chromium), fail."""
    if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
        pytest.fail(f"{reason}: CI must run the browser test (.ci/run installs chromium and chromium-driver; "
                    "selenium is in the test extra)")
    pytest.skip(f"{reason} (apt-get install chromium chromium-driver; pip install selenium)")


@pytest.fixture
def browser(tmp_path, monkeypatch):
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            _browser_missing(f"no {path}")
    if importlib.util.find_spec("selenium") is None:
        _browser_missing("selenium is not installed")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common import selenium_manager

    def no_selenium_manager(*args, **kwargs):
        raise AssertionError("Selenium Manager was called: it downloads drivers; the test uses Debian's chromedriver")

    monkeypatch.setattr(selenium_manager.SeleniumManager, "binary_paths", no_selenium_manager)
    monkeypatch.setenv("SE_OFFLINE", "true")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-default-apps", "--window-size=1280,1000", f"--user-data-dir={tmp_path / 'profile'}",
                # every name but the loopback address resolves to nothing: the page cannot reach the network
                "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


# the images' colours, by side, read back through a canvas (same origin: not tainted)
IMAGE_COLOURS_JS = """
return Array.from(document.querySelectorAll('.grid img')).map(function (img) {
  var c = document.createElement('canvas'); c.width = img.naturalWidth; c.height = img.naturalHeight;
  var g = c.getContext('2d'); g.drawImage(img, 0, 0); var d = g.getImageData(0, 0, 1, 1).data;
  return [img.closest('section').getAttribute('aria-labelledby'), d[0], d[1], d[2]];
});
"""
# what the test answers for the k-th prompt: quality always the red set (DIR_A); caption by prompt
CAPTION_ANSWERS = ["B", "B", "indifferent", "A"]


def _wait(driver, condition, what: str, timeout_s: float = 20):
    """Wait for `condition(driver)`; an element that went away with the page it was on counts as not yet."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout_s, ignored_exceptions=(StaleElementReferenceException,)).until(
        lambda d: condition(d), message=what)


def _screen_choice(left_dir: str, wanted: str) -> str:
    if wanted == "indifferent":
        return "indifferent"
    return "left" if wanted == left_dir else "right"


def _rate_prompt(driver, k: int, *, keyboard: bool) -> str:
    """Check the page shows prompt k (images loaded, the right colours, 8 a side) and answer it;
    returns which directory the page showed on the left."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    prompt = PROMPTS[k][0]
    assert driver.find_element(By.ID, "caption").text == prompt
    assert driver.find_element(By.ID, "progress").text.startswith(f"Prompt {k + 1} of {len(PROMPTS)} ({k} rated)")
    legend = driver.find_element(By.CSS_SELECTOR, "#q-caption legend").text
    assert legend == f"Which set of images better represents the text caption: \u201c{prompt}\u201d?"
    _wait(driver, lambda d: d.execute_script(
        "return Array.from(document.images).every(function (i) { return i.complete && i.naturalWidth > 0; })"),
        "images loaded")
    colours = driver.execute_script(IMAGE_COLOURS_JS)
    sides = {side: {tuple(c) for s, *c in colours if s == side} for side in ("set-a", "set-b")}
    assert [s for s, *_ in colours].count("set-a") == IMAGES_PER_SET == [s for s, *_ in colours].count("set-b")
    assert {frozenset(sides["set-a"]), frozenset(sides["set-b"])} == {frozenset({RED}), frozenset({BLUE})}, sides
    left_dir = "A" if sides["set-a"] == {RED} else "B"
    answers = {"quality": _screen_choice(left_dir, "A"), "caption": _screen_choice(left_dir, CAPTION_ANSWERS[k])}
    order = ["left", "indifferent", "right"]
    if keyboard:  # Tab into each radio group, Space + arrows to choose, Tab to the button, Enter
        actions = ActionChains(driver)
        for name in ("quality", "caption"):
            for _ in range(10):
                active = driver.switch_to.active_element
                if active.get_attribute("name") == name:
                    break
                actions.send_keys(Keys.TAB).perform()
            else:
                raise AssertionError(f"Tab never reached the {name} question")
            actions.send_keys(Keys.SPACE, *[Keys.ARROW_RIGHT] * order.index(answers[name])).perform()
        for name, value in answers.items():
            assert driver.find_element(By.CSS_SELECTOR, f"input[name={name}][value={value}]").is_selected()
        actions.send_keys(Keys.TAB).perform()
        assert driver.switch_to.active_element.get_attribute("type") == "submit"
        actions.send_keys(Keys.ENTER).perform()
    else:  # click the answer's label, as a person would
        for name, value in answers.items():
            driver.find_element(By.XPATH, f"//input[@name='{name}'][@value='{value}']/parent::label").click()
        driver.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    def moved_on(d):  # the next prompt's caption, or the "all rated" line (read in one step: no stale element)
        shown = d.execute_script("var e = document.getElementById('caption') || document.getElementById('done');"
                                 "return e && document.readyState === 'complete' ? e.textContent : null;")
        return shown is not None and shown != prompt

    try:
        _wait(driver, moved_on, f"the page moved on from prompt {k + 1}")
    except Exception as err:
        page = driver.find_element(By.TAG_NAME, "body").text[:500]
        raise AssertionError(f"prompt {k + 1}: the page did not move on; it says: {page}") from err
    return left_dir


def test_rating_in_a_browser_end_to_end(dirs, tmp_path, browser, servers):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    a, b = dirs
    out = tmp_path / "ratings"
    # a seed that puts DIR_A on the left for some prompts and on the right for others
    seed = next(s for s in range(100) if len({left_side(s, p) for p, _ in PROMPTS[:2]}) == 2
                and len({left_side(s, p) for p, _ in PROMPTS}) == 2)
    argv = (a, b, "--out", out, "--rater", "ann", "--seed", seed)
    server = servers(*argv)
    assert "4 prompts in both directories (DIR_A 5, DIR_B 5)" in server.lines[0]
    browser.get(server.url)
    shown_left = [_rate_prompt(browser, 0, keyboard=True), _rate_prompt(browser, 1, keyboard=False)]
    # two answers are on disk before the page moves on
    assert [r["prompt"] for r in read_answers(out / "answers.jsonl")[0]] == [p for p, _ in PROMPTS[:2]]

    browser.refresh()  # reload: resumes at the third prompt
    assert browser.find_element(By.ID, "caption").text == PROMPTS[2][0]
    assert "stopped; 2 answers" in server.stop()
    server = servers(*argv[:-2])  # restarted (without --seed: the session keeps its own): still the third
    assert "2 answers so far" in server.lines[0]
    browser.get(server.url)
    assert browser.find_element(By.ID, "caption").text == PROMPTS[2][0]
    shown_left += [_rate_prompt(browser, 2, keyboard=False), _rate_prompt(browser, 3, keyboard=False)]
    assert browser.find_element(By.ID, "done").text == f"All {len(PROMPTS)} prompts are rated. Thank you!"
    browser.refresh()
    assert browser.find_elements(By.ID, "done")

    # another rater, named on the start page (which the page's script fills with the last id used)
    browser.get(server.url + "?rater=")
    field = browser.find_element(By.ID, "rater")
    assert field.get_attribute("value") == "ann"
    field.clear()
    field.send_keys("bob", Keys.ENTER)
    _wait(browser, lambda d: d.find_elements(By.ID, "caption"), "bob's first prompt")
    assert browser.find_element(By.ID, "caption").text == PROMPTS[0][0]
    assert "rating as bob" in browser.find_element(By.ID, "progress").text
    assert "stopped; 4 answers" in server.stop()

    records, bad = read_answers(out / "answers.jsonl")
    assert bad == []
    assert [(r["rater"], r["prompt"], r["category"]) for r in records] == [("ann", p, c) for p, c in PROMPTS]
    assert [r["left"] for r in records] == shown_left == [left_side(seed, p) for p, _ in PROMPTS]
    assert set(shown_left) == {"A", "B"}
    assert [r["quality"] for r in records] == ["A"] * 4  # the red set, wherever it was shown
    assert [r["caption"] for r in records] == CAPTION_ANSWERS
    for r in records:
        assert r["left_dir"] == str((a if r["left"] == "A" else b).resolve())
        assert r["images_a"] == [f"sr256/{PROMPTS.index((r['prompt'], r['category'])):06d}-{k:03d}.png"
                                 for k in range(IMAGES_PER_SET)]
        assert datetime.fromisoformat(r["time"]).utcoffset().total_seconds() == 0
    session = json.loads((out / "rate.json").read_text())
    assert (session["seed"], session["dir_a"], session["dir_b"]) == (seed, str(a.resolve()), str(b.resolve()))

    proc = kiln("rate", "--summary", out)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert "4 answers from 1 rater on 4 prompts" in proc.stdout
    assert "with 95% Wilson score intervals" in proc.stdout
    assert re.search(r"all categories\s+4\s+100\.0% \[51\.0%, 100\.0%\]", proc.stdout), proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert next(iter(summary)) == "kiln:generated"
    quality, caption = summary["questions"]["quality"], summary["questions"]["caption"]
    assert quality["overall"]["n"] == 4 and quality["overall"]["A"]["count"] == 4
    assert quality["overall"]["A"]["low"] == pytest.approx(wilson_interval(4, 4)[0])
    assert [caption["overall"][c]["count"] for c in ("A", "indifferent", "B")] == [1, 1, 2]
    assert [caption["categories"]["colours"][c]["count"] for c in ("A", "indifferent", "B")] == [0, 1, 1]
    assert [caption["categories"]["counting"][c]["count"] for c in ("A", "indifferent", "B")] == [1, 0, 1]
    assert sorted(os.listdir(out)) == ["answers.jsonl", "rate.json", "summary.json"]
