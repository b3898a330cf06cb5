"""What a request's fields may hold: integers within their C types, finite floats, bounded lists and strings. One
checker per kind; `SamplingParams` names a checker for each of its fields, and the server's request models use the
same limits, so a value either side accepts is one the engine and torch accept too."""

import math
from dataclasses import dataclass

from tritium.engine.errors import InvalidParameter

INT32_MAX = 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
FLOAT32_MAX = 3.4028234663852886e38  # a float past it is infinite once in a float32 tensor


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass(frozen=True)
class Int:
    """An integer in [lo, hi] (a bool is not one); `optional`: None passes too."""

    lo: int = INT64_MIN
    hi: int = INT64_MAX
    optional: bool = False

    def check(self, name: str, value: object) -> int | None:
        if value is None and self.optional:
            return None
        if not _is_int(value) or not self.lo <= value <= self.hi:
            raise InvalidParameter(name, f"{name} must be an integer in [{self.lo}, {self.hi}], got {value!r}")
        return value


@dataclass(frozen=True)
class Float:
    """A number in [lo, hi] ((lo, hi] with `lo_open`), finite in float32; an int is taken as its float."""

    lo: float = -FLOAT32_MAX
    hi: float = FLOAT32_MAX
    lo_open: bool = False

    def check(self, name: str, value: object) -> float:
        ok = _is_int(value) or isinstance(value, float)
        if ok:
            value = float(value)
            ok = math.isfinite(value) and (self.lo < value if self.lo_open else self.lo <= value) and value <= self.hi
        if not ok:
            past = isinstance(value, float) and math.isfinite(value) and abs(value) > FLOAT32_MAX
            raise InvalidParameter(name, f"{name} must be a finite number{self._range()}"
                                   f"{' (float32: logits are)' if past else ''}, got {value!r}")
        return value

    def _range(self) -> str:
        if self.hi == FLOAT32_MAX:
            return "" if self.lo == -FLOAT32_MAX else f" {'>' if self.lo_open else '>='} {self.lo:g}"
        return f" in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}]"


@dataclass(frozen=True)
class Bool:
    def check(self, name: str, value: object) -> bool:
        if not isinstance(value, bool):
            raise InvalidParameter(name, f"{name} must be True or False, got {value!r}")
        return value


@dataclass(frozen=True)
class Ints:
    """A list or tuple of at most `max_items` integers in [lo, hi], kept as a tuple."""

    lo: int
    hi: int
    max_items: int

    def check(self, name: str, value: object) -> tuple[int, ...]:
        if not isinstance(value, (list, tuple)) or len(value) > self.max_items:
            raise InvalidParameter(name, f"{name} must be a list of at most {self.max_items} integers, got {value!r}")
        for x in value:
            Int(self.lo, self.hi).check(name, x)
        return tuple(value)


@dataclass(frozen=True)
class TokenMap:
    """None, or a dict of at most `max_items` token ids (ints in [0, max_id], or their decimal strings, as JSON
    carries keys) to values `value` checks; kept as {int: value}, or None when empty."""

    max_id: int
    value: Float
    max_items: int

    def check(self, name: str, value: object) -> dict[int, float] | None:
        if value is None:
            return None
        if not isinstance(value, dict) or len(value) > self.max_items:
            raise InvalidParameter(name, f"{name} must map at most {self.max_items} token ids to numbers, "
                                   f"got {value!r:.80}")
        out = {}
        for key, item in value.items():
            token = int(key) if isinstance(key, str) and key.isdigit() and len(key) <= 10 else key
            if not _is_int(token) or not 0 <= token <= self.max_id:
                raise InvalidParameter(name, f"{name} keys must be token ids in [0, {self.max_id}], got {key!r:.40}")
            try:
                out[token] = self.value.check(name, item)
            except InvalidParameter as exc:
                raise InvalidParameter(name, f"{exc} for token {token}") from None
        return out or None


@dataclass(frozen=True)
class Instance:
    """None or an instance of `cls` (which checks itself)."""

    cls: type

    def check(self, name: str, value: object) -> object:
        if value is not None and not isinstance(value, self.cls):
            raise InvalidParameter(name, f"{name} must be a {self.cls.__name__}, got {type(value).__name__}")
        return value


@dataclass(frozen=True)
class Strings:
    """None, one string or a list of at most `max_items`, each of 1 to `max_chars` characters of valid Unicode
    (no lone surrogates), kept as a tuple."""

    max_items: int
    max_chars: int

    def check(self, name: str, value: object) -> tuple[str, ...]:
        items = () if value is None else (value,) if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)) or len(items) > self.max_items:
            raise InvalidParameter(name, f"{name} must be a string or a list of at most {self.max_items} strings, "
                                   f"got {value!r}")
        for s in items:
            if not isinstance(s, str) or not 1 <= len(s) <= self.max_chars:
                raise InvalidParameter(name, f"{name}: each string must have 1 to {self.max_chars} characters, "
                                       f"got {s!r:.80}")
            check_unicode(name, s)
        return tuple(items)


def check_unicode(name: str, text: str) -> None:
    """Raise InvalidParameter when `text` is not valid Unicode (a lone surrogate, which JSON's \\ud800 escapes can
    carry): the tokenizer and the UTF-8 encoder of every answer refuse it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        message = f"{name} is not valid Unicode: a lone surrogate at character {exc.start}"
        raise InvalidParameter(name, message) from None
