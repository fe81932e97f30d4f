# SPDX-License-Identifier: Apache-2.0
"""``ControlClient``: how a producer engine's scheduler publishes finished
requests on its workers' transport listeners (same host), the moment they
finish rather than at the engine's next step."""

from __future__ import annotations

import logging
import select
import socket
import threading
from collections.abc import Sequence

from kvbridge import protocol as P
from kvbridge.layout import KVLayout
from kvbridge.transport.server import CONTROL_BACKEND

logger = logging.getLogger("kvbridge.transport")


class ControlClient:
    """Publishes (and, when another rank failed, releases) a producer's
    finished requests on one worker rank's transport listener.

    Used by KVBridgeConnector's scheduler side; it is the only publish. A
    send is retried once on a fresh connection; ``publish`` returns False
    when both tries failed, and the scheduler then frees the request's blocks
    itself. A publish the transport cannot carry out (bad ids, a failed host
    staging copy) comes back as the request released with reason "refused".
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
        """Send Publish; False if it could not be sent (logged)."""
        return self._send(P.Publish(request_id, [int(b) for b in block_ids], num_tokens))

    def release(self, request_id: str, reason: str) -> bool:
        """Send Release (the request will not be read); False if it could not be sent."""
        return self._send(P.Release(request_id, reason))

    def _send(self, msg: P.Message) -> bool:
        with self._lock:
            for attempt in (1, 2):
                try:
                    if self._sock is not None and self._peer_closed_locked():
                        self.close_locked()
                    if self._sock is None:
                        self._connect()
                    P.send_message(self._sock, msg)
                    return True
                except (OSError, P.ProtocolError, P.PeerRefused) as e:
                    self.close_locked()
                    if attempt == 2:
                        logger.warning("kvbridge: control %s of %s to %s failed: %s",
                                       type(msg).__name__, msg.request_id, self.address, e)
        return False

    def _peer_closed_locked(self) -> bool:
        """The transport never writes to a control connection after the
        handshake, so a readable socket is one it closed (the worker reopened
        its transport: vLLM's sleep mode, a restart). A send on it would
        still succeed locally and the message be lost."""
        try:
            readable, _, _ = select.select([self._sock], [], [], 0)
        except (OSError, ValueError):
            return True
        return bool(readable)

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
