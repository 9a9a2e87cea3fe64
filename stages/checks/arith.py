"""Checking the arithmetic written in a rationale, without `eval`.

Every `a op b = c` written in the text (`48 / 2 = 24`, `$10 + $5 = $15`, `3 x 4 = 12`, chains
such as `2 + 3 = 5 * 2 = 10` pairwise) and every GSM8K calculator annotation `<<48/2=24>>` is
parsed by a small recursive-descent parser over numbers, `+ - * / x × ÷`, `%` and parentheses,
and its value is compared with the number written after `=`. A result written rounded
(`10 / 3 = 3.33`, or `= 3` for whole people) is accepted within half a unit of its last
digit. Expressions that are not pure arithmetic (words, variables, `x = 5`) are skipped, not
guessed at.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# a tight fraction `1/4` is one number: humans write "25 / 1/3 = 75" meaning 25 / (1/3)
_FUSED = re.compile(r"\s*(?:(\d+/\d+(?![\d./%])|\d[\d,]*(?:\.\d+)?|\.\d+)|([-+*/×x÷()%^]))")
_TOKEN = re.compile(r"\s*(?:(\d[\d,]*(?:\.\d+)?|\.\d+)|([-+*/×x÷()%^]))")
_ANNOTATION = re.compile(r"<<([^<>=]*)=([^<>]*)>>")
# the number after "=": thousands by commas or spaces ("18 000"), a mixed fraction after it
# ("5 and 2/3"); not when an operator follows it (then it starts another expression)
_RESULT = re.compile(r"\s*(-?)\s*\$?\s*((?>\d{1,3}(?: \d{3})+(?![\d,.])|\d[\d,]*(?:\.\d+)?|\.\d+))"
                     r"(?![A-Za-z])(?:\s+(?:and\s+)?\(?(\d+)/(\d+)\)?)?(?!\s*[-+/*×x÷^]\s*[\w$(.])(\s*%)?")
# the arithmetic run that ends right before an "=": digits, operators, brackets, $ and spaces
_LHS = re.compile(r"[\d.,$%+\-*/×x÷()^ \t]+$")
_TIMES_NEXT = re.compile(r"\s*[\d(.]")
_LIST_COMMA = re.compile(r",\s+(?=\S)")
_PLAIN_NUMBER = re.compile(r"-?(\d+(\.\d+)?|\.\d+)")
# lines and sentences; "+ . 84" (a stray space) does not end a sentence
_SENTENCES = re.compile(r"\n|(?<=[^\d\s])\.\s+|(?<=\d)\.\s+(?=[A-Z])")
_MIXED_BEFORE = re.compile(r"\d\s+and\s*$")
_TIGHT_FRACTION = re.compile(r"\d/\d")
_CENTS = re.compile(r"\s*(?:cents?\b|¢)")
# the usual "a op b" written without commas or brackets, evaluated without the parser
_BINARY = re.compile(r"\$?(\d+(?:\.\d+)?|\.\d+)\s*([-+*/×x÷])\s*\$?(\d+(?:\.\d+)?|\.\d+)\s*$")
_DASHES = str.maketrans({"–": "-", "−": "-", "—": "-"})


class ParseError(ValueError):
    pass


_OPS = {"×": "*", "x": "*", "÷": "/"}
_THOUSANDS = re.compile(r"\d{1,3}(,\d{3})+(\.\d+)?")
_END = "end"


def _tokens(text: str, fuse: bool = False) -> list:
    """Numbers as floats, operators as one-character strings, then an end marker."""
    out: list = []
    text = text.replace("$", "").rstrip()
    pattern = _FUSED if fuse else _TOKEN
    pos = 0
    for m in pattern.finditer(text):
        if m.start() != pos:
            raise ParseError(f"not arithmetic at {text[pos:pos + 10]!r}")
        pos = m.end()
        num, op = m.groups()
        if op is not None:
            if op == "x" and not _TIMES_NEXT.match(text, pos):
                raise ParseError("'x' is a variable here, not a times sign")
            out.append(_OPS.get(op, op))
        elif "/" in num:
            a, b = num.split("/")
            if int(b) == 0 or (len(a) > 1 and a[0] == "0"):
                raise ParseError(f"{num!r} is not a fraction")
            out.append(int(a) / int(b))
        else:
            if len(num) > 1 and num[0] == "0" and num[1].isdigit():
                raise ParseError(f"{num!r} is a code or a time, not a number")
            if "," in num:
                if not _THOUSANDS.fullmatch(num):
                    raise ParseError(f"{num!r} is not a number")
                num = num.replace(",", "")
            out.append(float(num))
    if pos != len(text):
        raise ParseError(f"not arithmetic at {text[pos:pos + 10]!r}")
    out.append(_END)
    return out


class _Parser:
    """expr := term (('+'|'-') term)*; term := unary (('*'|'/') unary)*;
    unary := '-' unary | power; power := atom ('^' unary)?; atom := number '%'? | '(' expr ')'

    Tokens are floats (numbers) and strings (operators, then the end marker)."""

    def __init__(self, tokens: list):
        self.t, self.i = tokens, 0

    def parse(self) -> float:
        value = self.expr()
        if self.t[self.i] is not _END:
            raise ParseError("trailing tokens")
        return value

    def expr(self) -> float:
        value = self.term()
        t = self.t
        while t[self.i] == "+" or t[self.i] == "-":
            op = t[self.i]
            self.i += 1
            rhs = self.term()
            value = value + rhs if op == "+" else value - rhs
        return value

    def term(self) -> float:
        value = self.unary()
        t = self.t
        while t[self.i] == "*" or t[self.i] == "/":
            op = t[self.i]
            self.i += 1
            rhs = self.unary()
            if op == "*":
                value *= rhs
            elif rhs == 0:
                raise ParseError("division by zero")
            else:
                value /= rhs
        return value

    def unary(self) -> float:
        if self.t[self.i] == "-":
            self.i += 1
            return -self.unary()
        return self.power()

    def power(self) -> float:
        base = self.atom()
        if self.t[self.i] == "^":
            self.i += 1
            exp = self.unary()
            if exp != int(exp) or abs(exp) > 64:
                raise ParseError("only small whole exponents")
            return base ** int(exp)
        return base

    def atom(self) -> float:
        tok = self.t[self.i]
        self.i += 1
        if type(tok) is float:
            if self.t[self.i] == "%":
                self.i += 1
                return tok / 100
            return tok
        if tok == "(":
            value = self.expr()
            if self.t[self.i] != ")":
                raise ParseError("unbalanced parenthesis")
            self.i += 1
            return value
        raise ParseError(f"unexpected {tok!r}")


def evaluate(expression: str, fuse: bool = False) -> float:
    """The exact value of an arithmetic expression; ParseError when it is not one. `fuse`
    reads a tight `a/b` as one number (`25 / 1/3` = 75) instead of left to right (8.33)."""
    tokens = _tokens(expression, fuse)
    if len(tokens) == 1:
        raise ParseError("empty")
    return _Parser(tokens).parse()


def _close(value: float, written: str) -> bool:
    """`written` equals `value`, allowing the rounding its number of decimals implies."""
    result = float(written)
    if value == result:
        return True
    decimals = len(written) - written.index(".") - 1 if "." in written else 0
    return abs(value - result) <= 0.5 * 10.0 ** -decimals + 1e-9 * max(abs(value), 1.0)


@dataclass(frozen=True)
class ArithmeticError_:
    expression: str
    written: str
    value: str

    def __str__(self) -> str:
        return f"{self.expression} = {self.written} (it is {self.value})"


def _has_operator(tokens: list) -> bool:
    return any(type(t) is str and t in "+-*/^%" and t != _END for t in tokens) and any(
        type(t) is float for t in tokens)


def _strip_leading(lhs: str) -> str | None:
    """The arithmetic run before "=" as an expression, or None when it is only the tail of one
    whose start is in words ("237 potatoes - 60 = 177", "X + X*80% = 36"): that is skipped."""
    lhs = lhs.lstrip(" \t")
    # a list before the expression ("3, 4 + 5"): keep what follows the last list comma
    m = None
    for m in _LIST_COMMA.finditer(lhs):
        pass
    lhs = lhs[m.end():] if m else lhs
    lhs = lhs.lstrip(" \t$")
    while lhs.startswith("(") and lhs.count("(") > lhs.count(")"):
        lhs = lhs[1:].lstrip()
    if lhs.startswith(".") and not lhs[1:2].isdigit():
        lhs = lhs[1:].lstrip()
    if not lhs or lhs[0] in "+-*/×x÷%^),":
        return None
    return lhs


def check_arithmetic(text: str) -> tuple[int, ArithmeticError_ | None]:
    """(how many equations were checked, the first wrong one or None)."""
    checked = 0
    known: set[tuple[str, str]] = set()  # found right already: GSM8K writes most twice
    for m in _ANNOTATION.finditer(text):
        expr, written = m.group(1), m.group(2).strip().replace(",", "").replace("$", "")
        try:
            fast = _BINARY.match(expr)
            value = _binary(float(fast.group(1)), fast.group(2), float(fast.group(3))) \
                if fast and _no_leading_zero(fast) else evaluate(expr)
        except (ParseError, ZeroDivisionError, ValueError, OverflowError):
            continue
        if not _PLAIN_NUMBER.fullmatch(written):
            continue
        checked += 1
        if not _close(value, written):
            return checked, ArithmeticError_(expr.strip(), written, _show(value))
        known.add((expr.replace(" ", ""), written))
    plain = _ANNOTATION.sub(" ", text).translate(_DASHES)
    for line in _SENTENCES.split(plain):
        if "=" not in line:
            continue
        parts = line.split("=")
        for left, right in zip(parts, parts[1:]):
            lhs_m = _LHS.search(left, max(0, len(left) - 120))
            res = _RESULT.match(right)
            if not lhs_m or not res:
                continue
            lhs = _strip_leading(lhs_m.group(0))
            if lhs is None or _MIXED_BEFORE.search(left, 0, lhs_m.start()):
                continue  # also the fraction of a mixed number: "12 x 1 and 1/4 = 15"
            written = res.group(2).replace(",", "").replace(" ", "")
            if res.group(1):
                written = "-" + written
            if (lhs.replace(" ", ""), written) in known:
                checked += 1
                continue
            try:
                fast = _BINARY.match(lhs)
                if fast and _no_leading_zero(fast):
                    values = [_binary(float(fast.group(1)), fast.group(2),
                                      float(fast.group(3)))]
                else:
                    tokens = _tokens(lhs)
                    if not _has_operator(tokens):
                        continue
                    values = [_Parser(tokens).parse()]
                if _TIGHT_FRACTION.search(lhs):  # also read tight fractions as one number
                    try:
                        values.append(evaluate(lhs, fuse=True))
                    except (ParseError, ZeroDivisionError, ValueError, OverflowError):
                        pass
            except (ParseError, ZeroDivisionError, ValueError, OverflowError):
                continue
            checked += 1
            if not any(_matches(v, written, res, lhs) for v in values):
                return checked, ArithmeticError_(lhs.strip(), res.group(0).strip(),
                                                 _show(values[0]))
    return checked, None


def _no_leading_zero(m: re.Match) -> bool:
    a, b = m.group(1), m.group(3)
    return not (a[0] == "0" and a[1:2].isdigit() or b[0] == "0" and b[1:2].isdigit())


def _binary(a: float, op: str, b: float) -> float:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op in "*×x":
        return a * b
    if b == 0:
        raise ParseError("division by zero")
    return a / b


def _matches(value: float, written: str, res: re.Match, lhs: str) -> bool:
    if res.group(3):  # a mixed number: "17/3 = 5 and 2/3"
        whole = float(written)
        extra = int(res.group(3)) / (int(res.group(4)) or 1)
        if abs(value - (whole + (extra if whole >= 0 else -extra))) < 1e-9 * max(abs(value), 1):
            return True
    # "3/4 = 75%" and "1.2 x 100% = 120": a percentage is value * 100
    as_percent = res.group(5) or "%" in lhs
    # "$2.50 - $2.24 = 26 cents": dollars written as cents
    cents = _CENTS.match(res.string, res.end())
    return _close(value, written) or bool(as_percent or cents) and _close(value * 100, written)


def _show(value: float) -> str:
    return str(int(value)) if value == int(value) and abs(value) < 1e15 else f"{value:.6g}"
