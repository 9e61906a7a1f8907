"""pipeline.outdir: kiln touches only its own files in an output directory, and reads no output path
as a glob (issue 12: nothing of the user's is ever overwritten or deleted; a user's mistake is one line).
"""

import errno
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from apache_beam.io.filesystem import FileSystem
from apache_beam.io.filesystems import FileSystems

from pipeline import outdir
from pipeline.config import ConfigError
from pipeline.outdir import (CARD_MARKER, JSON_MARKER, JSON_MARKER_KEY, SUMMARY_MARKER, check_output, clear_output, escape_glob,
                             foreign_files, is_kiln_card, is_kiln_document, is_kiln_name, kiln_files, list_files, remove_temp_files)
from tests.pipeline.test_accounting import INPUT_ROWS, write_dataset
from tests.pipeline.test_card_facts import lowercase_dataset  # noqa: F401 - a fixture

REPO = Path(__file__).resolve().parents[2]
TEMP = ".tmp-0123456789ab"
KILN = ["shards/000000.tar", "meta/000000.parquet", "rejects/000000.parquet", "shards/000123.tar", "manifest.json",
        "stats.json", "_SUCCESS", "card_plots/samples.png", "card_plots/clip_similarity.png"]
USERS = ["shards/my_notes.txt", "meta/analysis.csv", "card_plots/my_plot.png", "notes.md", "shards/000000.tar.bak",
         "meta/old/000001.parquet", "shards/0001.tar", "rejects/000000.tar", "extra/stats.json", "stats.json.tmp-xyz"]
KILN_CARD = f"---\nlicense: unknown\n---\n\n{CARD_MARKER}\n\n# A dataset\n"
# The documents beside the card (pipeline.card): kiln's with their marker, the user's without.
KILN_DOCS = {"croissant.json": json.dumps({JSON_MARKER_KEY: JSON_MARKER, "@type": "sc:Dataset"}, indent=2),
             "training_summary.json": json.dumps({JSON_MARKER_KEY: JSON_MARKER, "template": "x"}),
             "training_summary.md": f"{SUMMARY_MARKER}\n\n# Public summary\n"}
USERS_DOCS = {"croissant.json": '{"@type": "sc:Dataset", "kiln:generated": "not first"}',
              "training_summary.json": "[]", "training_summary.md": f"# Mine\n\n{CARD_MARKER}\n"}


def _tree(root: Path, rels, data=b"x") -> None:
    for rel in rels:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)


def _rels(root: Path, paths) -> list[str]:
    return sorted(str(Path(p).relative_to(root)) for p in paths)


# -- names and globs -------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Possible nested set:FutureWarning")
def test_escape_glob_makes_every_glob_character_literal():
    assert escape_glob("gs://b/out[1]/x*?.tar") == "gs://b/out[[]1[]]/x[*][?].tar"
    assert escape_glob("/plain/dir_1-2.x") == "/plain/dir_1-2.x"
    for path in ("/d/out[1]", "/d/a]b[c", "/d/*", "/d/what?", "/d/[!x]", "/d/**/y", "/d/[]"):
        regex = re.compile(FileSystem.translate_pattern(escape_glob(path)))  # Beam's own glob -> regex
        assert regex.match(path), path
    regex = re.compile(FileSystem.translate_pattern(escape_glob("/d/out[1]/*")))
    assert not regex.match("/d/out1/*") and not regex.match("/d/out[1]/a")
    assert not re.compile(FileSystem.translate_pattern(escape_glob("/d/o?t"))).match("/d/out")


@pytest.mark.parametrize("rel, kiln", [
    *((r, True) for r in KILN), *((r, False) for r in USERS),
    ("card_plots/t5_len.png", True), ("card_plots/samples.png.bak", False), ("meta/000000.parquet.tmp", False),
])
def test_kiln_names_are_exact(rel, kiln):
    assert is_kiln_name(rel) is kiln
    assert is_kiln_name(rel + TEMP, temp=True) is kiln
    assert not is_kiln_name(rel, temp=True)


def test_temp_names():
    assert not is_kiln_name("README.md")  # kiln's only with the marker inside: is_kiln_card
    assert is_kiln_name("README.md" + TEMP, temp=True) and is_kiln_name("_kiln_write_check" + TEMP, temp=True)
    assert not is_kiln_name("stats.json.tmp-0123456789AB", temp=True) and not is_kiln_name("stats.json.tmp-0123", temp=True)
    assert not is_kiln_name("notes.txt" + TEMP, temp=True)
    for name in KILN_DOCS:
        assert not is_kiln_name(name) and is_kiln_name(name + TEMP, temp=True)
    assert re.fullmatch(r"/o/stats\.json\.tmp-[0-9a-f]{12}", outdir.temp_name("/o/stats.json"))


def test_the_card_marker(tmp_path):
    (tmp_path / "kiln.md").write_text(KILN_CARD)
    (tmp_path / "mine.md").write_text("# My dataset\n\nSee <!-- kiln:dataset-card --> in the text: not at a line start.\n")
    (tmp_path / "empty.md").write_bytes(b"")
    assert is_kiln_card(str(tmp_path / "kiln.md"))
    assert not is_kiln_card(str(tmp_path / "mine.md")) and not is_kiln_card(str(tmp_path / "empty.md"))
    assert not is_kiln_card(str(tmp_path / "missing.md"))
    assert "\n" not in CARD_MARKER and CARD_MARKER.startswith("<!-- kiln:dataset-card") and CARD_MARKER.endswith("-->")


def test_the_documents_beside_the_card_are_kiln_s_only_with_their_marker(tmp_path):
    for name, text in KILN_DOCS.items():
        (tmp_path / name).write_text(text)
        assert is_kiln_document(str(tmp_path / name)), name
        (tmp_path / name).write_text(USERS_DOCS[name])
        assert not is_kiln_document(str(tmp_path / name)), name
    (tmp_path / "README.md").write_text(KILN_CARD)
    assert is_kiln_document(str(tmp_path / "README.md")) and not is_kiln_document(str(tmp_path / "missing.json"))
    (tmp_path / "other.json").write_text(KILN_DOCS["croissant.json"])
    assert not is_kiln_document(str(tmp_path / "other.json"))  # not one of kiln's names
    assert is_kiln_document(str(tmp_path / "other.json"), "croissant.json")


# -- listing ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["out[1]", "out*", "out?", "a]b"])
def test_list_files_reads_no_glob(tmp_path, name, monkeypatch):
    target, decoy = tmp_path / name, tmp_path / "outX"
    _tree(target, ["a.txt", "b.parquet", "sub/c.txt"])
    _tree(decoy, ["decoy.txt"])
    _tree(tmp_path / "out1", ["decoy1.txt"])
    want = [str(target / "a.txt"), str(target / "b.parquet")]
    assert [m.path for m in list_files(str(target))] == want
    assert [m.size_in_bytes for m in list_files(str(target))] == [1, 1]
    assert [m.path for m in list_files(str(target) + "/", recursive=True)] == want[:1] + want[1:] + [str(target / "sub/c.txt")]
    assert list_files(str(tmp_path / "missing")) == [] and list_files(str(target / "a.txt")) == []
    # The path every non-local file system takes (FileSystems.match over the escaped directory), on a local directory:
    monkeypatch.setattr(outdir, "is_local", lambda path: False)
    assert [m.path for m in list_files(str(target))] == want
    assert [m.path for m in list_files(str(target), recursive=True)] == want + [str(target / "sub/c.txt")]
    assert list_files(str(tmp_path / "missing")) == []


def test_list_files_survives_a_symlink_loop(tmp_path):
    _tree(tmp_path / "out", ["a.txt", "sub/b.txt"])
    (tmp_path / "out" / "sub" / "loop").symlink_to(tmp_path / "out")
    assert _rels(tmp_path / "out", (m.path for m in list_files(str(tmp_path / "out"), recursive=True))) == ["a.txt", "sub/b.txt"]


def test_the_accounting_reads_an_output_named_with_brackets(tmp_path):
    from pipeline.accounting import Ledger
    from pipeline.finalize import check_accounting, read_footers

    out = tmp_path / "run[2024]"
    footers = write_dataset(out)
    assert sorted(read_footers(str(out))) == sorted(footers) == [0, 1]
    ledger = Ledger.from_files(str(out), list_tars=True)
    assert (ledger.kept, ledger.rejected) == (9, 9)
    result = check_accounting(str(out), INPUT_ROWS, read_footers(str(out)), None)
    assert result["ok"] and (result["kept"], result["rejected"]) == (9, 9)


def test_the_card_is_written_in_an_output_named_with_brackets(lowercase_dataset, tmp_path):  # noqa: F811
    from pipeline.card import write_card

    out = tmp_path / "cards[v2]"
    shutil.copytree(lowercase_dataset, out)
    path = write_card(str(out))
    assert path == out / "README.md" and CARD_MARKER in path.read_text()
    assert sorted(p.name for p in (out / "card_plots").iterdir()) == [
        "caption_chars.png", "clip_similarity.png", "image_sizes.png", "punsafe.png", "samples.png", "toxicity.png"]


# -- kiln's files and the user's -------------------------------------------------------------------


@pytest.fixture
def mixed(tmp_path):
    """An output directory holding kiln's files, kiln's temp files and the user's files."""
    out = tmp_path / "out"
    _tree(out, KILN)
    _tree(out, [r + TEMP for r in ("shards/000001.tar", "stats.json", "card_plots/t5_len.png")])
    _tree(out, USERS, b"mine")
    return out


def test_kiln_files_and_foreign_files(mixed):
    out = str(mixed)
    assert _rels(mixed, kiln_files(out)) == sorted(KILN)
    assert _rels(mixed, kiln_files(out, temp=True)) == sorted(r + TEMP for r in ("shards/000001.tar", "stats.json", "card_plots/t5_len.png"))
    assert _rels(mixed, foreign_files(out)) == sorted(USERS)
    (mixed / "README.md").write_text("# my README\n")
    assert "README.md" in _rels(mixed, foreign_files(out)) and "README.md" not in _rels(mixed, kiln_files(out))
    (mixed / "README.md").write_text(KILN_CARD)
    assert "README.md" not in _rels(mixed, foreign_files(out)) and "README.md" in _rels(mixed, kiln_files(out))


def test_clear_output_deletes_kiln_files_only(mixed):
    (mixed / "README.md").write_text("# my README\n")
    deleted = clear_output(str(mixed))
    assert len(deleted) == len(KILN) + 3
    left = sorted(str(p.relative_to(mixed)) for p in mixed.rglob("*") if p.is_file())
    assert left == sorted(USERS + ["README.md"])
    assert all((mixed / r).read_bytes() == b"mine" for r in USERS) and (mixed / "README.md").read_text() == "# my README\n"
    (mixed / "README.md").write_text(KILN_CARD)
    assert clear_output(str(mixed)) == [str(mixed / "README.md")] and not (mixed / "README.md").exists()
    assert clear_output(str(mixed / "missing")) == []


def test_kiln_documents_are_kiln_files_and_a_users_are_foreign(mixed):
    out = str(mixed)
    for name, text in KILN_DOCS.items():
        (mixed / name).write_text(text)
    assert set(KILN_DOCS) <= set(_rels(mixed, kiln_files(out))) and _rels(mixed, foreign_files(out)) == sorted(USERS)
    assert check_output(out, overwrite=True, card=True) and set(KILN_DOCS) <= set(_rels(mixed, clear_output(out)))
    for name, text in USERS_DOCS.items():
        (mixed / name).write_text(text)
    assert set(USERS_DOCS) <= set(_rels(mixed, foreign_files(out))) and not set(USERS_DOCS) & set(_rels(mixed, kiln_files(out)))
    clear_output(out)
    assert all((mixed / name).read_text() == text for name, text in USERS_DOCS.items())


def test_check_output_never_lets_the_card_replace_a_users_documents(tmp_path):
    for name, text in USERS_DOCS.items():
        out = tmp_path / name.replace(".", "_")
        _tree(out, KILN)
        (out / name).write_text(text)
        for overwrite in (False, True):
            with pytest.raises(ConfigError, match=rf"{name} is not a file kiln wrote .*: move it or pass --no-card$"):
                check_output(str(out), overwrite=overwrite, card=True)
        assert _rels(out, check_output(str(out), overwrite=True, card=False)) == [name]
        assert (out / name).read_text() == text


def test_remove_temp_files_removes_only_temp_files(mixed):
    assert _rels(mixed, remove_temp_files(str(mixed))) == sorted(r + TEMP for r in ("shards/000001.tar", "stats.json", "card_plots/t5_len.png"))
    assert kiln_files(str(mixed), temp=True) == [] and _rels(mixed, kiln_files(str(mixed))) == sorted(KILN)
    assert _rels(mixed, foreign_files(str(mixed))) == sorted(USERS)


def test_delete_files_deletes_exactly_the_paths_given(tmp_path):
    _tree(tmp_path, ["out[1]/stats.json", "out1/stats.json", "outX/stats.json", "out*/stats.json"])
    outdir.delete_files([str(tmp_path / "out[1]/stats.json"), str(tmp_path / "out*/stats.json"), str(tmp_path / "nope")])
    left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert left == ["out1/stats.json", "outX/stats.json"]


# -- check_output ----------------------------------------------------------------------------------


def _nothing_left_by_the_probe(out: Path) -> bool:
    return not list(out.glob("_kiln_write_check*"))


def test_check_output_accepts_a_new_or_empty_directory_and_kiln_files(tmp_path):
    new = tmp_path / "a" / "new[1]"
    assert check_output(str(new), overwrite=False, card=True) == []
    assert new.is_dir() and list(new.iterdir()) == []
    _tree(new, KILN)
    (new / "README.md").write_text(KILN_CARD)
    assert check_output(str(new), overwrite=False, card=True) == []
    assert _nothing_left_by_the_probe(new)


def test_check_output_refuses_a_file(tmp_path):
    (tmp_path / "out").write_text("data")
    with pytest.raises(ConfigError, match=r"^--output .*/out is a file, not a directory: choose a directory"):
        check_output(str(tmp_path / "out"), overwrite=True, card=False)
    with pytest.raises(ConfigError, match=r"^cannot create --output .*/out/sub: Not a directory"):
        check_output(str(tmp_path / "out" / "sub"), overwrite=False, card=False)
    assert (tmp_path / "out").read_text() == "data"


def test_check_output_refuses_files_kiln_did_not_write_without_overwrite(mixed):
    with pytest.raises(ConfigError) as err:
        check_output(str(mixed), overwrite=False, card=False)
    msg = str(err.value)
    assert "\n" not in msg
    assert msg == (f"--output {mixed} holds {len(USERS)} file(s) kiln did not write (card_plots/my_plot.png, extra/stats.json, "
                   f"meta/analysis.csv and {len(USERS) - 3} more): choose an empty --output or pass --overwrite "
                   "(kiln then deletes only its own files)")
    kept = check_output(str(mixed), overwrite=True, card=True)
    assert _rels(mixed, kept) == sorted(USERS)
    assert _nothing_left_by_the_probe(mixed)


def test_check_output_never_lets_the_card_replace_a_users_readme(mixed):
    (mixed / "README.md").write_text("# my README\n")
    for overwrite in (False, True):
        with pytest.raises(ConfigError, match=r"README.md is not a dataset card kiln wrote .*: move it or pass --no-card$"):
            check_output(str(mixed), overwrite=overwrite, card=True)
    assert "README.md" in _rels(mixed, check_output(str(mixed), overwrite=True, card=False))
    assert (mixed / "README.md").read_text() == "# my README\n"


def test_check_output_refuses_a_directory_it_cannot_write(tmp_path, monkeypatch):
    out = tmp_path / "ro"
    out.mkdir()

    def read_only(path, *a, **kw):
        raise OSError(errno.EROFS, "Read-only file system", path)

    monkeypatch.setattr(FileSystems, "create", read_only)
    with pytest.raises(ConfigError, match=rf"^cannot write in --output {re.escape(str(out))}: Read-only file system; "
                                          r"choose a directory you can write to"):
        check_output(str(out), overwrite=False, card=True)
    assert list(out.iterdir()) == []


def test_check_output_refuses_a_directory_it_cannot_create(tmp_path, monkeypatch):
    def denied(path, *a, **kw):
        raise PermissionError(errno.EACCES, "Permission denied", path)

    monkeypatch.setattr(os, "makedirs", denied)
    with pytest.raises(ConfigError, match=r"^cannot create --output .*/new: Permission denied; choose a directory you can write to$"):
        check_output(str(tmp_path / "new"), overwrite=False, card=True)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file modes")
def test_check_output_refuses_a_read_only_directory(tmp_path):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    try:
        with pytest.raises(ConfigError, match=r"^cannot write in --output .*: Permission denied"):
            check_output(str(out), overwrite=False, card=True)
        with pytest.raises(ConfigError, match=r"^cannot create --output .*/ro/sub: Permission denied"):
            check_output(str(out / "sub"), overwrite=False, card=True)
        assert list(out.iterdir()) == []
    finally:
        out.chmod(0o755)


# -- `kiln card` over files that are not kiln's ----------------------------------------------------


def _card_cli(directory) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("KILN_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "pipeline.cli", "card", str(directory)], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=300)


GOOD_MANIFEST = {"num_shards": 0, "samples": 0, "shards": []}


@pytest.mark.parametrize("file, content, says", [
    ("stats.json", b"{not json", r"stats.json: not valid JSON \(Expecting property name"),
    ("stats.json", b"\xff\xfe garbage", r"stats.json: not valid JSON"),
    ("stats.json", b"[1, 2]", r"stats.json: a JSON list, not the JSON object of the run's stats"),
    ("stats.json", b"{}", r"stats.json: no 'input' key"),
    ("stats.json", json.dumps({"input": {"rows": "7"}}).encode(), r"stats.json: 'input' should be an object with \"rows\" \(an integer\)"),
    ("manifest.json", b"", r"manifest.json: not valid JSON"),
    ("manifest.json", json.dumps({"shards": [{"shard": "x"}]}).encode(), r"manifest.json: shards\[0\].shard should be str or int of digits"),
])
def test_card_over_garbage_json_is_one_card_error(lowercase_dataset, file, content, says):  # noqa: F811
    from pipeline.card import CardError, write_card

    (lowercase_dataset / file).write_bytes(content)
    with pytest.raises(CardError, match=says) as err:
        write_card(str(lowercase_dataset))
    assert "\n" not in str(err.value) and str(lowercase_dataset / file) in str(err.value)
    assert not (lowercase_dataset / "README.md").exists() and not (lowercase_dataset / "card_plots").exists()


def test_card_over_stats_of_the_wrong_kind_is_one_card_error(lowercase_dataset):  # noqa: F811
    from pipeline.card import CardError, write_card

    stats = json.loads((lowercase_dataset / "stats.json").read_text())
    stats["flags"]["max_bytes"] = "lots"  # formatted as a number in the card
    (lowercase_dataset / "stats.json").write_text(json.dumps(stats))
    with pytest.raises(CardError, match=r"stats.json: unexpected content \(ValueError"):
        write_card(str(lowercase_dataset))
    (lowercase_dataset / "stats.json").write_text(json.dumps({**stats, "flags": ["not", "a", "dict"]}))
    with pytest.raises(CardError, match=r"stats.json: 'flags' should be dict, is \[\"not\""):
        write_card(str(lowercase_dataset))


@pytest.mark.parametrize("stats", [b"\x00garbage", b'{"input": []}'])
def test_kiln_card_command_on_garbage_stats_is_one_line(tmp_path, stats):
    (tmp_path / "stats.json").write_bytes(stats)
    (tmp_path / "manifest.json").write_text(json.dumps(GOOD_MANIFEST))
    res = _card_cli(tmp_path)
    assert res.returncode == 1, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    assert lines[0].startswith(f"kiln card: error: {tmp_path}/stats.json: ")
    assert not (tmp_path / "README.md").exists()


def test_kiln_card_never_replaces_a_users_readme(lowercase_dataset):  # noqa: F811
    from pipeline.card import CardError, write_card

    (lowercase_dataset / "README.md").write_text("# my README\n")
    _tree(lowercase_dataset, ["card_plots/my_plot.png"], b"mine")
    with pytest.raises(CardError, match=r"README.md is not a dataset card kiln wrote .*move it away and re-run$"):
        write_card(str(lowercase_dataset))
    assert (lowercase_dataset / "README.md").read_text() == "# my README\n"
    assert [p.name for p in (lowercase_dataset / "card_plots").iterdir()] == ["my_plot.png"]
    res = _card_cli(lowercase_dataset)
    assert res.returncode == 1 and len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr, res.stderr
    assert "README.md is not a dataset card kiln wrote" in res.stderr


def test_kiln_card_replaces_its_own_card_and_only_the_plots_it_names(lowercase_dataset):  # noqa: F811
    from pipeline.card import write_card

    _tree(lowercase_dataset, ["card_plots/my_plot.png", "card_plots/t5_len.png.mine", "card_plots/notes.txt"], b"mine")
    _tree(lowercase_dataset, ["card_plots/t5_len.png"], b"an old kiln plot")  # this run has no T5 plot: stale
    first = write_card(str(lowercase_dataset)).read_text()
    assert CARD_MARKER in first
    assert not (lowercase_dataset / "card_plots/t5_len.png").exists()
    for rel in ("card_plots/my_plot.png", "card_plots/t5_len.png.mine", "card_plots/notes.txt"):
        assert (lowercase_dataset / rel).read_bytes() == b"mine"
    assert write_card(str(lowercase_dataset)).read_text() == first  # its own card: replaced
    assert not [p for p in lowercase_dataset.rglob("*") if ".tmp-" in p.name]


def test_the_marker_keeps_the_hub_metadata_valid(lowercase_dataset):  # noqa: F811
    from huggingface_hub import DatasetCard

    from pipeline.card import build_card
    from pipeline.card.hub import validate_card_metadata

    text, _, meta = build_card(str(lowercase_dataset))
    card = DatasetCard(text)
    assert card.data.to_dict() == meta and validate_card_metadata(meta) == []
    head, _, body = text.partition("\n---\n")
    assert head.startswith("---\n") and CARD_MARKER not in head
    assert body.lstrip("\n").startswith(CARD_MARKER + "\n")
