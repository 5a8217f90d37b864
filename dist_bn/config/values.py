"""Value types of a config key: each checks (and normalizes) one YAML value and
describes itself for the reference table and for error messages.

A check raises `ValueProblem`, phrased to follow its key ('must be ..., got
...'); `dist_bn.config.loader` puts the file and the key in front. Strings
with control characters are refused everywhere (`control_character_problem`):
every string can reach a log line, a generated script or a manifest.
"""
from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass
from typing import Any

class ValueProblem(Exception):
    """What is wrong with a value, phrased to follow its key: 'must be ..., got ...'."""


def show(value: Any) -> str:
    """Render a YAML value the way the user wrote it, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__


# Characters that end a line, or change what a terminal, a shell or a YAML
# parser sees, inside what looks like one line: C0 and C1 controls (newline,
# carriage return, escape, NEL ...), DEL, and Unicode's line and paragraph
# separators. No config string needs them, and every string can reach a
# generated script or manifest, so they are refused outright.
CONTROL_CHARACTERS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def printable(text: str) -> str:
    """`text` with every control character written as its Python escape
    (\\n, \\x1b, \\u2028): safe to put in one comment or message line."""
    return CONTROL_CHARACTERS.sub(lambda m: repr(m.group())[1:-1], text)


def control_character_problem(value: Any) -> str | None:
    """What is wrong if `value` (a string, or a list/mapping of them) holds a
    control character, else None."""
    texts = ([value] if isinstance(value, str) else list(value) if isinstance(value, list)
             else [*value, *value.values()] if isinstance(value, dict) else [])
    for text in texts:
        if isinstance(text, str):
            found = CONTROL_CHARACTERS.search(text)
            if found:
                return (f"must be printable text on one line, got {printable(repr(text))} with "
                        f"{printable(repr(found.group()))} at position {found.start()}")
    return None


def closest(word: str, candidates: list[str]) -> str | None:
    """The candidate most like `word` (difflib), for 'did you mean ...?' hints."""
    found = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    return found[0] if found else None


class ValueType:
    """Base of the value types; `name` and `allowed` feed the docs table."""

    name = "?"

    def allowed(self) -> str:
        return "any"

    def check(self, value: Any) -> Any:  # pragma: no cover - overridden
        raise NotImplementedError


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class Int(ValueType):
    """An integer, optionally bounded (inclusive)."""

    min: int | None = None
    max: int | None = None
    name = "int"

    def allowed(self) -> str:
        if self.min is not None and self.max is not None:
            return f"{self.min} .. {self.max}"
        if self.min is not None:
            return f">= {self.min}"
        if self.max is not None:
            return f"<= {self.max}"
        return "any"

    def _wanted(self) -> str:
        if self.min is not None and self.max is not None:
            return f"an integer from {self.min} to {self.max}"
        if self.min is not None:
            return f"an integer >= {self.min}"
        if self.max is not None:
            return f"an integer <= {self.max}"
        return "an integer"

    def check(self, value: Any) -> int:
        if not _is_int(value):
            raise ValueProblem(f"must be {self._wanted()}, got {show(value)}")
        if (self.min is not None and value < self.min) or (self.max is not None and value > self.max):
            raise ValueProblem(f"must be {self._wanted()}, got {value}")
        return value


# PyYAML follows YAML 1.1, which reads 1e-3 (no dot) as a string. Accept that
# spelling for floats instead of failing on a number the user clearly meant.
_SCI_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


@dataclass(frozen=True)
class Float(ValueType):
    """A real number with optional open or closed bounds; integers are accepted."""

    min: float | None = None
    max: float | None = None
    min_open: bool = False
    max_open: bool = False
    name = "float"

    def allowed(self) -> str:
        lo, hi = self.min, self.max
        if lo is not None and hi is not None:
            return f"{'(' if self.min_open else '['}{lo:g}, {hi:g}{')' if self.max_open else ']'}"
        if lo is not None:
            return f"{'>' if self.min_open else '>='} {lo:g}"
        if hi is not None:
            return f"{'<' if self.max_open else '<='} {hi:g}"
        return "any"

    def check(self, value: Any) -> float:
        bound = self.allowed()
        if bound == "any":
            wanted = "a number"
        elif bound[0] in "([":
            wanted = f"a number in {bound}"
        else:
            wanted = f"a number {bound}"
        if isinstance(value, str) and _SCI_FLOAT.fullmatch(value.strip()):
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueProblem(f"must be {wanted}, got {show(value)}")
        value = float(value)
        lo, hi = self.min, self.max
        if lo is not None and (value < lo or (self.min_open and value == lo)):
            raise ValueProblem(f"must be {wanted}, got {value:g}")
        if hi is not None and (value > hi or (self.max_open and value == hi)):
            raise ValueProblem(f"must be {wanted}, got {value:g}")
        return value


@dataclass(frozen=True)
class Bool(ValueType):
    """true or false (YAML booleans only, so a typo is not read as a string)."""

    name = "bool"

    def allowed(self) -> str:
        return "true, false"

    def check(self, value: Any) -> bool:
        if not isinstance(value, bool):
            raise ValueProblem(f"must be true or false, got {show(value)}")
        return value


@dataclass(frozen=True)
class Choice(ValueType):
    """One string out of a fixed set."""

    choices: tuple[str, ...]
    name = "str"

    def allowed(self) -> str:
        return ", ".join(self.choices)

    def check(self, value: Any) -> str:
        if value in self.choices and isinstance(value, str):
            return value
        listed = ", ".join(self.choices)
        hint = closest(value, list(self.choices)) if isinstance(value, str) else None
        suffix = f" (did you mean {hint}?)" if hint else ""
        raise ValueProblem(f"must be one of {listed}; got {show(value)}{suffix}")


@dataclass(frozen=True)
class Text(ValueType):
    """A non-empty string; `name` says what it holds (str, path, command)."""

    name: str = "str"

    def allowed(self) -> str:
        return "non-empty"

    def check(self, value: Any) -> str:
        if not isinstance(value, str) or not value.strip():
            raise ValueProblem(f"must be a non-empty string, got {show(value)}")
        return value


@dataclass(frozen=True)
class TextList(ValueType):
    """A list of non-empty strings (numbers are taken as text).

    With `comma_string`, a single "a,b" string is accepted and split, which is
    how the same value is written on the command line of horovodrun.
    """

    comma_string: bool = False
    name = "list of str"

    def allowed(self) -> str:
        return "list, or \"a,b\" string" if self.comma_string else "list"

    def check(self, value: Any) -> list[str]:
        wanted = "a list of strings" + (" or a comma-separated string" if self.comma_string else "")
        if self.comma_string and isinstance(value, str):
            value = value.split(",")
        if not isinstance(value, list):
            raise ValueProblem(f"must be {wanted}, got {show(value)}")
        items = []
        for item in value:
            if isinstance(item, bool) or not isinstance(item, (str, int, float)):
                raise ValueProblem(f"must be {wanted}; item {show(item)} is not a string")
            text = str(item).strip() if self.comma_string else str(item)
            if not text:
                raise ValueProblem(f"must be {wanted}; it has an empty item")
            items.append(text)
        return items


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True)
class EnvMap(ValueType):
    """Environment variables, NAME: value; values become strings."""

    name = "mapping"

    def allowed(self) -> str:
        return "NAME: value"

    def check(self, value: Any) -> dict[str, str]:
        if not isinstance(value, dict):
            raise ValueProblem(f"must be a mapping of NAME: value, got {show(value)}")
        env = {}
        for name, item in value.items():
            if not isinstance(name, str) or not _ENV_NAME.fullmatch(name):
                raise ValueProblem(f"{show(name)} is not a valid environment variable name")
            if isinstance(item, bool) or not isinstance(item, (str, int, float)):
                raise ValueProblem(
                    f"value of {name} must be a string or a number, got {show(item)}"
                    + (" (quote it: 'true')" if isinstance(item, bool) else "")
                )
            env[name] = str(item)
        return env
