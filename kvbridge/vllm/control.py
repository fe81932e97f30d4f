# SPDX-License-Identifier: Apache-2.0
"""``ControlClient``: the scheduler's shortcut to publish finished requests on
its own producer's transport listener (same host), ahead of the worker's step."""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Sequence

from kvbridge import protocol as P
from kvbridge.layout import KVLayout
from kvbridge.transport.server import CONTROL_BACKEND

logger = logging.getLogger("kvbridge.transport")


class ControlClient:
    """Publishes a producer's finished requests straight to its transport's
    listener (same host), so blocks are readable before the engine's next step.

    Used by KVBridgeConnector's scheduler side. Failures are logged and the
    connection is retried on the next publish; the worker's own step-based
    publish stays as the fallback, so nothing depends on this path.
    """

    def __init__(self, address: str, layout: KVLayout, secret: bytes | None,
                 timeout_s: float = 2.0):
        self.address = address
        self.layout = layout
        self.secret = secret
        self.timeout_s = timeout_s
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()

    def publish(self, request_id: str, block_ids: Sequence[int],
                num_tokens: int | None = None) -> bool:
        msg = P.Publish(request_id, [int(b) for b in block_ids], num_tokens)
        with self._lock:
            for attempt in (1, 2):
                try:
                    if self._sock is None:
                        self._connect()
                    P.send_message(self._sock, msg)
                    return True
                except (OSError, P.ProtocolError, P.PeerRefused) as e:
                    self.close_locked()
                    if attempt == 2:
                        logger.warning("kvbridge: control publish of %s to %s failed: %s "
                                       "(the worker publishes at its next step)", request_id,
                                       self.address, e)
        return False

    def _connect(self) -> None:
        host, _, port = self.address.rpartition(":")
        sock = socket.create_connection((host, int(port)), timeout=self.timeout_s)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            P.client_handshake(sock, self.layout, CONTROL_BACKEND, self.secret, {},
                               "control")
        except BaseException:
            sock.close()
            raise
        self._sock = sock

    def close_locked(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            except OSError:
                pass
            self._sock = None

    def close(self) -> None:
        with self._lock:
            self.close_locked()
