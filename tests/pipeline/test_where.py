"""pipeline.where: the --where language parses, type-checks and evaluates with SQL's null logic,
and every mistake is one line naming the position or the column -- never eval."""

import pyarrow as pa
import pytest

from pipeline.where import BOOL, NUM, STR, WhereError, column_kinds, compile_where

KINDS = {"clip_similarity": NUM, "punsafe": NUM, "stored_width": NUM, "LICENSE": STR, "t5_truncated": BOOL,
         "clip_image_embedding": None, "odd name": NUM}


def evaluate(expr, row):
    return compile_where(expr, KINDS).test(row)


@pytest.mark.parametrize("expr,row,want", [
    ("clip_similarity >= 0.30 and punsafe < 0.1", {"clip_similarity": 0.31, "punsafe": 0.05}, True),
    ("clip_similarity >= 0.30 and punsafe < 0.1", {"clip_similarity": 0.29, "punsafe": 0.05}, False),
    ("clip_similarity >= 0.30 and punsafe < 0.1", {"clip_similarity": 0.31, "punsafe": None}, None),
    ("clip_similarity >= 0.30 and punsafe < 0.1", {"clip_similarity": 0.2, "punsafe": None}, False),  # false and null
    ("clip_similarity >= 0.30 or punsafe < 0.1", {"clip_similarity": 0.5, "punsafe": None}, True),  # true or null
    ("not punsafe > 0.5", {"punsafe": None}, None),  # not null is null: rejected either way
    ("punsafe is null", {"punsafe": None}, True),
    ("punsafe is not null", {"punsafe": float("nan")}, False),  # NaN counts as null
    ("LICENSE in ('cc-by', 'cc0')", {"LICENSE": "cc0"}, True),
    ("LICENSE not in ('cc-by', 'cc0')", {"LICENSE": "cc0"}, False),
    ("LICENSE in ('cc-by')", {"LICENSE": None}, None),
    ("LICENSE = 'it''s'", {"LICENSE": "it's"}, True),
    ("stored_width * 2 - 1 >= 127 and stored_width / 0 is null", {"stored_width": 64}, True),
    ("-stored_width < -63", {"stored_width": 64}, True),
    ("t5_truncated", {"t5_truncated": True}, True),
    ("NOT t5_truncated = true", {"t5_truncated": False}, True),
    ("(punsafe < 0.1 or punsafe is null) and `odd name` >= 1e-3", {"punsafe": None, "odd name": 0.5}, True),
    ("stored_width in (64, 128, -1)", {"stored_width": 128}, True),
])
def test_values_and_nulls(expr, row, want):
    assert evaluate(expr, row) is want
    assert compile_where(expr, KINDS).keeps(row) is (want is True)


def test_explain_names_the_values():
    w = compile_where("clip_similarity >= 0.3 and punsafe < 0.1", KINDS)
    assert w.columns == ("clip_similarity", "punsafe")
    assert w.explain({"clip_similarity": 0.3125, "punsafe": None}) == \
        "clip_similarity >= 0.3 and punsafe < 0.1 is null (clip_similarity=0.3125, punsafe=null)"


@pytest.mark.parametrize("expr,words", [
    ("clip_sim > 0.3", ["unknown column 'clip_sim'", "position 1", "clip_similarity, punsafe"]),
    ("clip_similarity >", ["position 18", "found the end"]),
    ("clip_similarity > 'a'", ["cannot compare a number with a string", "position 17"]),
    ("clip_image_embedding is null", ["'clip_image_embedding'", "binary"]),
    ("punsafe", ["a number is not a condition"]),
    ("punsafe = null", ["is null"]),
    ("__import__('os').system('x')", ["cannot read \".system", "position 17"]),
    ("__import__('os')", ["unknown column '__import__'"]),
    ("punsafe < 0.1; drop", ["cannot read ';", "position 14"]),
    ("(punsafe < 0.1", ["closing )"]),
    ("LICENSE + 1 > 2", ["+ needs numbers"]),
    ("t5_truncated > false", ["booleans compare with = or != only"]),
    ("LICENSE in ('a', 1)", ["cannot compare a string with a number"]),
    ("", ["empty expression"]),
    ("punsafe < 0.1 punsafe", ["expected and / or / the end", "position 15"]),
])
def test_mistakes_are_one_line(expr, words):
    with pytest.raises(WhereError) as e:
        compile_where(expr, KINDS)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("--where: ")
    for w in words:
        assert w in msg, (w, msg)


def test_kinds_from_an_arrow_schema():
    schema = pa.schema([("a", pa.int32()), ("b", pa.float32()), ("c", pa.string()), ("d", pa.bool_()), ("e", pa.binary()),
                        ("f", pa.dictionary(pa.int8(), pa.string()))])
    assert column_kinds(schema) == {"a": NUM, "b": NUM, "c": STR, "d": BOOL, "e": None, "f": STR}
