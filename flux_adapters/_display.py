"""Showing a caller's value in a message: short, printable, and never raising.

A careless caller may pass anything: a 5,000-digit int (whose ``str()`` Python refuses), a
structure nested past the recursion limit, an object whose ``__repr__`` raises, text with
control characters or lone surrogates. Every message that shows such a value goes through here.
"""

from __future__ import annotations

import functools
import re
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    import reprlib

__all__ = [
    "SHOWN_CHARS",
    "describe_exception",
    "escape_controls",
    "escape_surrogates",
    "printable",
    "render_value",
    "short_path",
    "shown_url",
    "toml_key",
    "type_name",
]

SHOWN_CHARS: Final = 80
"""The longest a value is shown in a message."""
_NOT_PRINTABLE: Final = re.compile(r"[^\x20-\x7e]")


@functools.cache
def _repr_engine() -> reprlib.Repr:
    """A `reprlib.Repr` that bounds depth and width and survives huge ints; built on first use."""
    import reprlib

    class ShortRepr(reprlib.Repr):
        def repr_int(self, x: int, level: int) -> str:
            if type(x) is not int:  # a user class that happens to be called "int"
                return self.repr_instance(x, level)
            try:
                return super().repr_int(x, level)
            except ValueError:  # over sys.get_int_max_str_digits() digits
                digits = int(x.bit_length() * 0.30103) + 1
                return f"<int of about {digits} digits>"

        def repr_str(self, x: str, level: int) -> str:
            if type(x) is not str:
                return self.repr_instance(x, level)
            return super().repr_str(x, level)

        def repr_bytes(self, x: bytes, level: int) -> str:
            if type(x) is not bytes:
                return self.repr_instance(x, level)
            if len(x) <= self.maxstring:
                return repr(x)
            return f"{x[: self.maxstring]!r}... ({len(x)} bytes)"

    engine = ShortRepr()
    engine.maxlevel = 3
    engine.maxstring = engine.maxother = 60
    engine.maxlong = 40
    engine.maxlist = engine.maxtuple = engine.maxset = engine.maxfrozenset = 4
    engine.maxdeque = engine.maxarray = 4
    engine.maxdict = 3
    return engine


def escape_controls(text: str) -> str:
    r"""*text* with every non-printable character escaped (``\x1b``), whatever its length.

    Keeps printable non-ASCII (an accented letter, Chinese); escapes controls (a terminal's
    escape sequences), bidirectional overrides, surrogates and the like. Provider text shown
    in a message goes through here: it reaches terminals.
    """
    if not _NOT_PRINTABLE.search(text):
        return text
    return "".join(
        char if char.isprintable() else char.encode("unicode_escape").decode("ascii")
        for char in text
    )


_SURROGATE: Final = re.compile(r"[\ud800-\udfff]")


def escape_surrogates(json_text: str) -> str:
    r"""*json_text* (``json.dumps(..., ensure_ascii=False)``) with lone surrogates escaped.

    Python decodes a file name's bytes that are not UTF-8 to lone surrogates; left as they are,
    they cannot be written as UTF-8 (or are written back as the raw bytes, which no UTF-8 reader
    takes). Surrogates appear only inside JSON strings, where the escape (``\udcff``) is JSON
    and reads back to the same name.
    """
    return _SURROGATE.sub(lambda found: f"\\u{ord(found[0]):04x}", json_text)


_HIDDEN: Final = "[redacted]"


def shown_url(url: str) -> str:
    """*url* for a message or a repr, its user info and query hidden; the rest as given.

    A URL a caller gives (a reference image's, say) may carry a credential: a password
    (``https://user:pw@host/...``) or a signature in its query (a presigned S3, GCS or Azure
    URL). Plain string work, so that even a URL too broken to parse is shown without them.
    """
    scheme, slashes, rest = url.partition("://")
    if slashes:
        ends = [at for at in (rest.find(mark) for mark in "/?#") if at >= 0]
        authority = rest[: min(ends, default=len(rest))]
        if "@" in authority:
            host = authority.rpartition("@")[2]
            rest = f"{_HIDDEN}@{host}{rest[len(authority) :]}"
        url = f"{scheme}{slashes}{rest}"
    path, query, _ = url.partition("?")
    return f"{path}?{_HIDDEN}" if query else path


def printable(text: str) -> str:
    """*text* with every non-printable character escaped, cut to a bounded length."""
    if len(text) > 4 * SHOWN_CHARS:
        text = text[: 4 * SHOWN_CHARS]
    text = escape_controls(text)
    return text if len(text) <= SHOWN_CHARS else text[: SHOWN_CHARS - 3] + "..."


_BARE_KEY: Final = re.compile(r"[A-Za-z0-9_-]+")
_TOML_ESCAPES: Final = {
    '"': '\\"',
    "\\": "\\\\",
    **{char: "\\" + letter for char, letter in zip("\b\t\n\f\r", "btnfr", strict=True)},
}


def short_path(text: str, most: int = SHOWN_CHARS) -> str:
    """A path for messages: printable, and its end (the file name) kept past *most* characters."""
    if len(text) > most and text.isprintable():
        return "..." + text[-(most - 3) :]
    if text.isprintable():
        return text
    return render_value(text)


def toml_key(text: str) -> str:
    r"""*text* written as a TOML key, so that a message shows the key the file has.

    A bare key as it is (``laozhang``); any other quoted as a TOML basic string, every control or
    non-printable character escaped (``"a.b"``, ``"bad\r\nname"``): never a line break or an
    escape sequence in a message. Past `SHOWN_CHARS`, cut and marked with ``...``.
    """
    if len(text) <= SHOWN_CHARS and _BARE_KEY.fullmatch(text):
        return text
    cut = text[:SHOWN_CHARS]
    quoted = "".join(
        _TOML_ESCAPES.get(char)
        or (
            char
            if char.isprintable()
            else f"\\u{ord(char):04x}"
            if ord(char) <= 0xFFFF
            else f"\\U{ord(char):08x}"
        )
        for char in cut
    )
    return f'"{quoted}"' + ("..." if len(text) > SHOWN_CHARS else "")


def type_name(value: object) -> str:
    """The name of *value*'s type, for messages; never raises, whatever the type does."""
    try:
        return printable(type(value).__name__)
    except Exception:  # a metaclass may override __getattribute__ on the class itself
        return "object"


def render_value(value: object) -> str:
    """*value* rendered for a message: short, printable, and never raising, whatever it is.

    Shared by every message that shows a caller's value (limits, providers, flows).
    """
    try:
        text: object = _repr_engine().repr(value)
    except Exception:  # a user __repr__ (or __len__, __iter__ reached by it) may raise anything
        text = None
    if type(text) is not str or not text:
        return f"<{type_name(value)} object>"
    return printable(text)


def describe_exception(error: BaseException) -> str:
    """``Type: message`` for *error*, short and printable, never raising."""
    try:
        detail = str(error)
    except Exception:
        detail = ""
    name = type_name(error)
    return printable(f"{name}: {detail}" if type(detail) is str and detail else name)
