"""The one error type of the codec package."""

from __future__ import annotations

from flq.errors import UsageError


class CodecError(UsageError, ValueError):
    """A tensor, payload or chunk that cannot be encoded or decoded.

    The message names the field, the value got and the value expected, e.g.
    ``"payload length: got 3 bytes, expected 4 (= ceil(10*3/8))"``, so a transport can pass it
    to the peer unchanged. It subclasses ValueError so generic callers can catch either.
    """
