# SPDX-License-Identifier: Apache-2.0
"""One error family for everything kvbridge raises or reports.

Every error is a :class:`KVBridgeError` with a machine-readable ``code``
(an :class:`ErrorCode`, which is a ``str``), so callers classify a failure by
its code, never by parsing its message. The same codes travel on the wire
(``protocol.Error.code``, ``protocol.PullError.code``), are the keys of a
transport's ``failures`` counters, reach vLLM's logs in the connector's
failure reports and come back in the proxy's OpenAI error bodies.

Each class also keeps the builtin it always was (``ValueError``,
``KeyError``, ``RuntimeError``...), so ``except ValueError`` in a caller's
code still catches a refused layout.
"""

from __future__ import annotations

import enum
from typing import Sequence


class ErrorCode(str, enum.Enum):
    """Why something failed. The values are stable: they are wire codes and metric labels."""

    #: The two sides' KV layouts cannot be paired (model, dtype, heads, TP...).
    LAYOUT = "layout"
    #: The peer speaks another protocol version.
    VERSION = "version"
    #: The shared secret is missing or wrong (either side).
    AUTH = "auth"
    #: A malformed, unexpected or oversized message; the connection closes.
    PROTOCOL = "protocol"
    #: The producer does not hold the request (yet): the consumer retries for a while.
    NOT_PUBLISHED = "not_published"
    #: The producer held the request once and let it go (read, released, lease expired).
    ENDED = "ended"
    #: Block ids out of range, duplicated or of the wrong count.
    BLOCKS = "blocks"
    #: Nothing happened within the configured timeout.
    TIMEOUT = "timeout"
    #: The peer closed the connection or died.
    PEER_GONE = "peer_gone"
    #: Bytes landed but their end-to-end checksum did not match.
    CHECKSUM = "checksum"
    #: The caller cancelled the transfer.
    CANCELLED = "cancelled"
    #: Invalid configuration (unknown key, bad value).
    CONFIG = "config"
    #: The consumer asked for a medium the producer does not serve or cannot
    #: serve to it (cma across hosts); ``auto`` then tries the next one.
    BACKEND = "backend"
    #: The transport itself failed (a backend error, a failed local copy).
    TRANSFER = "transfer"

    def __str__(self) -> str:  # "layout", not "ErrorCode.LAYOUT"
        return self.value


class KVBridgeError(Exception):
    """Base of every kvbridge error; ``code`` says which kind it is."""

    code: ErrorCode = ErrorCode.TRANSFER

    def __init__(self, message: str = "", code: ErrorCode | str | None = None):
        super().__init__(message)
        if code is not None:
            self.code = ErrorCode(code)

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""


class ConfigError(KVBridgeError, ValueError):
    """A configuration kvbridge cannot run with."""

    code = ErrorCode.CONFIG


class LayoutMismatchError(KVBridgeError, ValueError):
    """Two KV layouts disagree; ``differences`` holds (field, local, remote),
    ``why`` (if any) says why those differences cannot be bridged."""

    code = ErrorCode.LAYOUT

    def __init__(self, differences: Sequence[tuple[str, object, object]], why: str = ""):
        self.differences = list(differences)
        self.why = why
        detail = "; ".join(f"{f}: local {lv}, remote {rv}" for f, lv, rv in self.differences)
        super().__init__(f"KV layout mismatch: {detail}" + (f" ({why})" if why else ""))


class BlockIdError(KVBridgeError, ValueError):
    """Block ids that cannot be used: out of range, duplicated or miscounted."""

    code = ErrorCode.BLOCKS


class ProtocolError(KVBridgeError):
    """The peer sent something this side cannot accept; the connection closes."""

    code = ErrorCode.PROTOCOL


class PeerClosed(KVBridgeError, ConnectionError):
    """The peer closed the connection (cleanly or mid-frame); ``received``:
    bytes of the frame that did arrive (0: between frames)."""

    code = ErrorCode.PEER_GONE

    def __init__(self, message: str = "peer closed the connection", received: int = 0):
        super().__init__(message)
        self.received = received


class PeerRefusedError(KVBridgeError):
    """The producer answered the handshake with an ``Error``; ``error`` is that
    message and ``code`` its code (layout, auth, version...)."""

    def __init__(self, error):
        self.error = error
        super().__init__(f"producer refused ({error.code}): {error.message}",
                         from_wire_code(error.code))


class TransferError(KVBridgeError, RuntimeError):
    """A transfer failed; ``code`` says why, the message says it for people."""


class UnknownRequestError(KVBridgeError, KeyError):
    """A read of a request the producer does not hold; ``code`` says whether
    it may still be published (``not_published``) or is gone (``ended``)."""

    def __init__(self, message: str, code: ErrorCode | str):
        super().__init__(message, code)

    def __str__(self) -> str:  # KeyError would quote the message
        return self.message


def from_wire_code(code: str) -> ErrorCode:
    """The ``ErrorCode`` of a code a peer sent; one this side does not know
    (an older or newer peer's, or ``internal``) counts as a protocol error."""
    try:
        return ErrorCode(code)
    except ValueError:
        return ErrorCode.PROTOCOL


def code_of(exc: BaseException) -> ErrorCode:
    """The code of any exception: its own for kvbridge errors, else a best fit by type."""
    if isinstance(exc, KVBridgeError):
        return exc.code
    if isinstance(exc, TimeoutError):
        return ErrorCode.TIMEOUT
    if isinstance(exc, (ConnectionError, EOFError)):
        return ErrorCode.PEER_GONE
    return ErrorCode.TRANSFER


__all__ = [
    "BlockIdError",
    "ConfigError",
    "ErrorCode",
    "KVBridgeError",
    "LayoutMismatchError",
    "PeerClosed",
    "PeerRefusedError",
    "ProtocolError",
    "TransferError",
    "UnknownRequestError",
    "code_of",
    "from_wire_code",
]
