"""Untrusted request bodies: size-bounded while read, strictly decoded, parsed and checked off the
event loop before any route sees them.

Every problem is an :class:`~ggufship.serve.errors.APIError` caused by the request (4xx) naming what
is wrong and, where it is inside the JSON, the parameter (``messages[2].content``): a client can never
turn malformed input into a 5xx (which the canary gate counts against the model).
"""

from __future__ import annotations

import json
import json.scanner
import math
from dataclasses import dataclass
from typing import Any

from ggufship.serve.errors import InvalidRequestError, RequestTooLargeError

#: Bodies with at most this many ``,``/``[``/``{`` bytes are parsed by the C decoder (about a ms at
#: most); others by the pure-Python one, which lets the event loop's thread run between values (the C
#: decoder holds the GIL until it is done: ~0.1 s for 100,000 small objects).
FAST_PARSE_STRUCTURE = 2_048
#: Deepest JSON nesting accepted (the API's own bodies need 4).
MAX_DEPTH = 32
#: Integers beyond a signed 64-bit value are no parameter of this API.
INT_LIMIT = 2**63


@dataclass(frozen=True)
class BodyLimits:
    max_bytes: int
    max_values: int
    max_messages: int


def _key(key: str) -> str:
    shown = key if key.isprintable() else ascii(key)[1:-1]  # NUL, surrogates... as escapes
    return shown if len(shown) <= 64 else shown[:61] + "..."


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{_key(key)}" if path else _key(key)


def _text_problem(text: str) -> str | None:
    """Lone UTF-16 surrogates (JSON ``"\\ud800"``; a valid escaped pair is decoded into one
    character) and NUL. C-speed scans only (``isascii``, ``in``, ``encode``)."""
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            return (
                f"contains a lone UTF-16 surrogate U+{ord(text[exc.start]):04X} at character {exc.start}; "
                "text must be valid Unicode (a surrogate only as half of an escaped pair)"
            )
    if "\x00" in text:
        return f"contains U+0000 (NUL) at character {text.index(chr(0))}; text must not contain NUL"
    return None


def check_size(declared: int | None, limits: BodyLimits) -> None:
    if declared is not None and declared > limits.max_bytes:
        raise RequestTooLargeError(
            f"request body of {declared} bytes (Content-Length) exceeds the limit of "
            f"{limits.max_bytes} bytes (max_request_bytes)"
        )


def too_large(read: int, limits: BodyLimits) -> RequestTooLargeError:
    return RequestTooLargeError(
        f"request body exceeds the limit of {limits.max_bytes} bytes (max_request_bytes); "
        f"{read} bytes received before it was refused"
    )


def parse(body: bytes, limits: BodyLimits) -> Any:
    """The JSON document of ``body``, or an :class:`InvalidRequestError` saying what is wrong.

    Checked: UTF-8 (strict: no overlong forms, no encoded surrogates), valid JSON, at most
    ``max_values`` JSON values, nesting depth, every string (keys too) without lone surrogates or
    NUL, finite numbers, integers within 64 bits, at most ``max_messages`` chat messages.
    CPU-bound: call it off the event loop."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequestError(
            f"request body is not valid UTF-8: byte 0x{body[exc.start]:02x} at offset {exc.start} "
            f"({exc.reason})",
            code="invalid_encoding",
        ) from None
    structural = body.count(b",") + body.count(b"[") + body.count(b"{")
    try:
        if structural <= FAST_PARSE_STRUCTURE:
            doc = json.loads(text)
        else:
            doc = _python_decoder(limits.max_values).decode(text)
    except _TooManyValues:
        raise _too_many(limits) from None
    except json.JSONDecodeError as exc:
        raise InvalidRequestError(
            f"request body is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})",
            code="json_invalid",
        ) from None
    except RecursionError:
        raise InvalidRequestError(
            f"request body is nested too deeply (at most {MAX_DEPTH} levels)", code="json_invalid"
        ) from None
    except ValueError as exc:  # e.g. an integer with more digits than Python converts
        raise InvalidRequestError(
            f"request body is not acceptable JSON: {exc}", code="json_invalid"
        ) from None
    _check(doc, limits)
    return doc


class _TooManyValues(Exception):
    pass


_CONSTANTS = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def _python_decoder(limit: int) -> json.JSONDecoder:
    """The standard library's pure-Python scanner, counting the values it makes and stopping at
    ``limit`` (so a body of 100,000 tiny objects never gets built: building them costs as much in
    garbage-collector pauses, which stop every thread, as in parsing). One per call: it keeps state."""
    count = 0

    def counted(parse: Any) -> Any:
        def one(*args: Any) -> Any:
            nonlocal count
            count += 1
            if count > limit:
                raise _TooManyValues
            return parse(*args)

        return one

    decoder = json.JSONDecoder(
        parse_float=counted(float), parse_int=counted(int), parse_constant=counted(_CONSTANTS.__getitem__)
    )
    decoder.parse_object = counted(decoder.parse_object)  # type: ignore[attr-defined]
    decoder.parse_array = counted(decoder.parse_array)  # type: ignore[attr-defined]
    decoder.parse_string = counted(decoder.parse_string)  # type: ignore[attr-defined]
    decoder.scan_once = json.scanner.py_make_scanner(decoder)  # type: ignore[attr-defined]
    return decoder


def _too_many(limits: BodyLimits) -> InvalidRequestError:
    return InvalidRequestError(
        f"request body has more than {limits.max_values} JSON values (max_json_values)",
        code="too_many_values",
    )


def _check(doc: Any, limits: BodyLimits) -> None:
    if isinstance(doc, dict):
        messages = doc.get("messages")
        if isinstance(messages, list) and len(messages) > limits.max_messages:
            raise InvalidRequestError(
                f"messages: at most {limits.max_messages} messages per request (max_messages), "
                f"got {len(messages)}",
                param="messages",
            )
    stack: list[tuple[Any, str, int]] = [(doc, "", 0)]
    values = 0
    while stack:
        value, path, depth = stack.pop()
        values += 1
        if values > limits.max_values:
            raise _too_many(limits)
        if isinstance(value, str):
            problem = _text_problem(value)
            if problem is not None:
                _fail(path, problem)
        elif isinstance(value, bool) or value is None:
            continue
        elif isinstance(value, int):
            if not -INT_LIMIT < value < INT_LIMIT:
                _fail(path, f"integer out of range ({len(str(abs(value)))} digits; |n| must be < 2^63)")
        elif isinstance(value, float):
            if not math.isfinite(value):
                _fail(path, f"number must be finite, got {value}")
        elif isinstance(value, dict | list):
            if depth >= MAX_DEPTH:
                _fail(path, f"nested too deeply (at most {MAX_DEPTH} levels)")
            if isinstance(value, dict):
                for key, item in value.items():
                    child = _join(path, key)
                    problem = _text_problem(key)
                    if problem is not None:
                        _fail(child, f"the key {problem}")
                    stack.append((item, child, depth + 1))
            else:
                stack.extend((item, _join(path, i), depth + 1) for i, item in enumerate(value))


def _fail(path: str, problem: str) -> None:
    where = path or "request body"
    raise InvalidRequestError(f"{where}: {problem}", param=path or None)
