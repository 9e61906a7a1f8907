"""`kiln subset --where EXPR`: a small, safe expression language over a dataset's stored columns.

Nothing here calls eval, exec or compile: a hand-written tokenizer and recursive-descent parser
build a tree of closures, checked against the columns' types before any row is read.

    expr       := or
    or         := and ("or" and)*
    and        := not ("and" not)*
    not        := "not" not | comparison
    comparison := sum [ ("=" | "==" | "!=" | "<>" | "<" | "<=" | ">" | ">=") sum
                      | "is" ["not"] "null"
                      | ["not"] "in" "(" literal ("," literal)* ")" ]
    sum        := product (("+" | "-") product)*
    product    := unary (("*" | "/") unary)*
    unary      := "-" unary | primary
    primary    := NUMBER | 'string' | "string" | true | false | null | COLUMN | `any column name` | "(" expr ")"

Keywords are case-insensitive; column names are exact. Strings compare with strings, numbers with
numbers, booleans (a bool column such as `t5_truncated`, or true/false) with booleans; a bool column
alone is a condition. Binary columns (the embeddings) cannot be used.

Nulls follow SQL's three-valued logic: a comparison or arithmetic with null is null (unknown), as
is x / 0 and a NaN value; `not null` is null; `null and false` is false, `null or true` is true.
`is null` / `is not null` test for null. A sample is kept only when the whole expression is true:
false or null rejects it (`kiln subset`: stage `subset`, reason `where`, detail naming the values).

A syntax error, an unknown column or a type mismatch is a UserError in one line naming the
position (1-based character) or the column, and the columns there are.
"""

from __future__ import annotations

import math
import operator
import re
from dataclasses import dataclass

from pipeline.errors import UserError

# Column kinds the language knows; anything else (binary, lists, structs) is not usable.
NUM, STR, BOOL, NULL = "number", "string", "bool", "null"
_KEYWORDS = {"and", "or", "not", "is", "null", "in", "true", "false"}
_TOKEN = re.compile(
    r"""\s*(?:
        (?P<num>(?:\d+\.\d*|\.\d+|\d+)(?:[eE][+-]?\d+)?)
      | (?P<str>'(?:[^']|'')*'|"(?:[^"]|"")*")
      | (?P<quoted>`[^`]+`)
      | (?P<name>[A-Za-z_][A-Za-z0-9_.]*)
      | (?P<op><=|>=|!=|<>|==|[=<>+\-*/(),])
    )""",
    re.VERBOSE,
)
_CMP = {"=": operator.eq, "==": operator.eq, "!=": operator.ne, "<>": operator.ne, "<": operator.lt,
        "<=": operator.le, ">": operator.gt, ">=": operator.ge}
_ARITH = {"+": operator.add, "-": operator.sub, "*": operator.mul}


class WhereError(UserError):
    """A --where expression that does not parse or does not fit the columns (one line, exit 2)."""


@dataclass(frozen=True)
class _Tok:
    kind: str  # num, str, name, col (a column name, bare or `quoted`), op, kw, end
    text: str
    value: object
    pos: int  # 1-based character position in the expression


def arrow_kind(arrow_type) -> str | None:
    """The language's kind of an Arrow column type (None: not usable in --where)."""
    import pyarrow as pa

    t = arrow_type
    if pa.types.is_dictionary(t):
        t = t.value_type
    if pa.types.is_boolean(t):
        return BOOL
    if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t):
        return NUM
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return STR
    return None


def column_kinds(schema) -> dict[str, str | None]:
    """{column: kind or None} of an Arrow schema (a meta parquet's)."""
    return {f.name: arrow_kind(f.type) for f in schema}


def tokenize(text: str) -> list[_Tok]:
    out, i = [], 0
    while text[i:].strip():
        m = _TOKEN.match(text, i)
        if m is None or not m.lastgroup:
            j = i + (len(text[i:]) - len(text[i:].lstrip()))
            raise WhereError(f"--where: cannot read {text[j:j + 12]!r} at position {j + 1} of {text!r}: use column names, "
                             f"numbers, 'strings', and/or/not, = != < <= > >=, is [not] null, in (...), + - * /")
        kind, raw = m.lastgroup, m.group(m.lastgroup)
        pos = m.start(kind) + 1
        if kind == "num":
            out.append(_Tok("num", raw, float(raw) if any(c in raw for c in ".eE") else int(raw), pos))
        elif kind == "str":
            q = raw[0]
            out.append(_Tok("str", raw, raw[1:-1].replace(q + q, q), pos))
        elif kind == "quoted":
            out.append(_Tok("col", raw, raw[1:-1], pos))
        elif kind == "name" and raw.lower() in _KEYWORDS:
            out.append(_Tok("kw", raw, raw.lower(), pos))
        elif kind == "name":
            out.append(_Tok("col", raw, raw, pos))
        else:
            out.append(_Tok("op", raw, raw, pos))
        i = m.end()
    out.append(_Tok("end", "", None, len(text) + 1))
    return out


def _is_null(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


@dataclass
class _Node:
    kind: str  # NUM, STR, BOOL or NULL (a literal null)
    fn: object  # row -> value (None: null)


class _Parser:
    def __init__(self, text: str, kinds: dict[str, str | None]):
        self.text, self.kinds = text, kinds
        self.toks = tokenize(text)
        self.i = 0
        self.columns: list[str] = []

    # -- helpers --
    def peek(self) -> _Tok:
        return self.toks[self.i]

    def take(self) -> _Tok:
        t = self.toks[self.i]
        self.i += 1
        return t

    def at(self, kind: str, *values) -> bool:
        t = self.peek()
        return t.kind == kind and (not values or t.value in values)

    def fail(self, what: str, tok: _Tok | None = None) -> WhereError:
        tok = tok or self.peek()
        found = "the end" if tok.kind == "end" else repr(tok.text)
        return WhereError(f"--where: {what} at position {tok.pos} (found {found}) in {self.text!r}")

    def expect(self, kind: str, value=None, what: str = "") -> _Tok:
        if not self.at(kind, *(() if value is None else (value,))):
            raise self.fail(f"expected {what or value or kind}")
        return self.take()

    def condition(self, node: _Node, tok: _Tok) -> _Node:
        if node.kind not in (BOOL, NULL):
            raise self.fail(f"a {node.kind} is not a condition (compare it: >, =, is null, ...)", tok)
        return node

    # -- grammar --
    def parse(self) -> _Node:
        if self.at("end"):
            raise self.fail("an empty expression; expected a condition such as clip_similarity >= 0.3")
        start = self.peek()
        node = self.condition(self.or_(), start)
        if not self.at("end"):
            raise self.fail("expected and / or / the end")
        return node

    def or_(self) -> _Node:
        start = self.peek()
        left = self.and_()
        while self.at("kw", "or"):
            op = self.take()
            right = self.condition(self.and_(), op)
            left = _Node(BOOL, _or(self.condition(left, start).fn, right.fn))
        return left

    def and_(self) -> _Node:
        start = self.peek()
        left = self.not_()
        while self.at("kw", "and"):
            op = self.take()
            right = self.condition(self.not_(), op)
            left = _Node(BOOL, _and(self.condition(left, start).fn, right.fn))
        return left

    def not_(self) -> _Node:
        if self.at("kw", "not"):
            op = self.take()
            inner = self.condition(self.not_(), op)
            f = inner.fn
            return _Node(BOOL, lambda r: None if (v := f(r)) is None else not v)
        return self.comparison()

    def comparison(self) -> _Node:
        left = self.sum_()
        t = self.peek()
        if t.kind == "op" and t.value in _CMP:
            self.take()
            right = self.sum_()
            self.same_kind(left, right, t)
            op, lf, rf = _CMP[t.value], left.fn, right.fn
            if left.kind == BOOL and t.value not in ("=", "==", "!=", "<>"):
                raise self.fail("booleans compare with = or != only", t)
            return _Node(BOOL, lambda r: None if _is_null(a := lf(r)) or _is_null(b := rf(r)) else op(a, b))
        if t.kind == "kw" and t.value == "is":
            self.take()
            negate = bool(self.at("kw", "not") and self.take())
            self.expect("kw", "null", "null (is null / is not null)")
            f = left.fn
            return _Node(BOOL, (lambda r: not _is_null(f(r))) if negate else (lambda r: _is_null(f(r))))
        negate = False
        if t.kind == "kw" and t.value == "not" and self.toks[self.i + 1].kind == "kw" and self.toks[self.i + 1].value == "in":
            self.take()
            negate = True
            t = self.peek()
        if t.kind == "kw" and t.value == "in":
            self.take()
            self.expect("op", "(", "( after in")
            values = [self.literal(left)]
            while self.at("op", ","):
                self.take()
                values.append(self.literal(left))
            self.expect("op", ")", ") or , in the in (...) list")
            f, allowed = left.fn, frozenset(values)
            if negate:
                return _Node(BOOL, lambda r: None if _is_null(v := f(r)) else v not in allowed)
            return _Node(BOOL, lambda r: None if _is_null(v := f(r)) else v in allowed)
        return left

    def literal(self, left: _Node):
        t = self.peek()
        if t.kind == "op" and t.value == "-" and self.toks[self.i + 1].kind == "num":
            self.take()
            num = self.take()
            node, tok = _Node(NUM, None), num
            value = -num.value
        elif t.kind in ("num", "str") or (t.kind == "kw" and t.value in ("true", "false")):
            self.take()
            tok = t
            value = t.value if t.kind != "kw" else t.value == "true"
            node = _Node({"num": NUM, "str": STR, "kw": BOOL}[t.kind], None)
        else:
            raise self.fail("expected a number, a 'string', true or false in the in (...) list")
        self.same_kind(left, node, tok)
        return value

    def same_kind(self, a: _Node, b: _Node, tok: _Tok) -> None:
        if NULL in (a.kind, b.kind):
            raise self.fail("a comparison with null is never true: write `is null` or `is not null`", tok)
        if a.kind != b.kind:
            raise self.fail(f"cannot compare a {a.kind} with a {b.kind}", tok)

    def sum_(self) -> _Node:
        left = self.product()
        while self.at("op", "+", "-"):
            op = self.take()
            right = self.product()
            left = self.arith(left, right, op)
        return left

    def product(self) -> _Node:
        left = self.unary()
        while self.at("op", "*", "/"):
            op = self.take()
            right = self.unary()
            left = self.arith(left, right, op)
        return left

    def arith(self, left: _Node, right: _Node, op: _Tok) -> _Node:
        for n in (left, right):
            if n.kind != NUM:
                raise self.fail(f"{op.text} needs numbers, not a {n.kind}", op)
        lf, rf = left.fn, right.fn
        if op.value == "/":
            def fn(r):
                a, b = lf(r), rf(r)
                return None if _is_null(a) or _is_null(b) or b == 0 else a / b
        else:
            f = _ARITH[op.value]

            def fn(r):
                a, b = lf(r), rf(r)
                return None if _is_null(a) or _is_null(b) else f(a, b)
        return _Node(NUM, fn)

    def unary(self) -> _Node:
        if self.at("op", "-"):
            op = self.take()
            inner = self.unary()
            if inner.kind != NUM:
                raise self.fail(f"- needs a number, not a {inner.kind}", op)
            f = inner.fn
            return _Node(NUM, lambda r: None if _is_null(v := f(r)) else -v)
        return self.primary()

    def primary(self) -> _Node:
        t = self.peek()
        if t.kind == "num":
            self.take()
            v = t.value
            return _Node(NUM, lambda r: v)
        if t.kind == "str":
            self.take()
            v = t.value
            return _Node(STR, lambda r: v)
        if t.kind == "kw" and t.value in ("true", "false"):
            self.take()
            v = t.value == "true"
            return _Node(BOOL, lambda r: v)
        if t.kind == "kw" and t.value == "null":
            self.take()
            return _Node(NULL, lambda r: None)
        if t.kind == "col":
            self.take()
            name = t.value
            if name not in self.kinds:
                raise WhereError(f"--where: unknown column {name!r} at position {t.pos}; the columns are: "
                                 f"{', '.join(c for c, k in self.kinds.items() if k)}")
            kind = self.kinds[name]
            if kind is None:
                raise WhereError(f"--where: column {name!r} (position {t.pos}) is binary or nested and cannot be compared; "
                                 f"usable columns: {', '.join(c for c, k in self.kinds.items() if k)}")
            if name not in self.columns:
                self.columns.append(name)
            return _Node(kind, lambda r: r.get(name))
        if t.kind == "op" and t.value == "(":
            self.take()
            node = self.or_()
            self.expect("op", ")", "a closing )")
            return node
        raise self.fail("expected a column, a number, a 'string', true/false/null or (")


def _and(a, b):
    def fn(r):
        x = a(r)
        if x is False:
            return False
        y = b(r)
        if y is False:
            return False
        return None if x is None or y is None else True
    return fn


def _or(a, b):
    def fn(r):
        x = a(r)
        if x is True:
            return True
        y = b(r)
        if y is True:
            return True
        return None if x is None or y is None else False
    return fn


@dataclass(frozen=True)
class Where:
    """A compiled --where expression: `test(row)` -> True / False / None (null), `columns` it reads."""

    text: str
    columns: tuple[str, ...]
    _fn: object

    def test(self, row: dict) -> bool | None:
        v = self._fn(row)
        return None if v is None else bool(v)

    def keeps(self, row: dict) -> bool:
        return self.test(row) is True

    def explain(self, row: dict) -> str:
        """Why a row failed, for a reject's detail: the result and the values the expression read."""
        verdict = "null" if self.test(row) is None else "false"
        values = ", ".join(f"{c}={_show(row.get(c))}" for c in self.columns)
        return f"{self.text} is {verdict}" + (f" ({values})" if values else "")


def _show(v) -> str:
    if _is_null(v):
        return "null"
    if isinstance(v, str):
        return repr(v[:80])
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def compile_where(text: str, kinds: dict[str, str | None]) -> Where:
    """Parse and type-check `text` against `kinds` ({column: kind}, e.g. column_kinds(meta schema))."""
    if not isinstance(text, str):
        raise WhereError("--where: the expression must be text")
    p = _Parser(text, kinds)
    node = p.parse()
    return Where(text.strip(), tuple(p.columns), node.fn)
