# SPDX-License-Identifier: Apache-2.0
"""``HeldRelay``: a TCP relay in front of a real server whose answers can be
held back - a slow network on the way back, with every byte still real."""

from __future__ import annotations

import socket
import threading


class HeldRelay:
    """Listens on 127.0.0.1 and relays each connection to ``target`` (host,
    port). Requests always pass; answers pass only while ``release()``d
    (``hold()`` stops them, in order, until the next ``release()``)."""

    def __init__(self, target: tuple[str, int]):
        self.target = target
        self._open = threading.Event()
        self._open.set()
        self._closed = False
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self._accept, daemon=True, name="relay-accept").start()

    def hold(self) -> None:
        self._open.clear()

    def release(self) -> None:
        self._open.set()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._socks += [client, server]
            threading.Thread(target=self._pump, args=(client, server, False),
                             daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, True),
                             daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, answers: bool) -> None:
        try:
            while data := src.recv(1 << 16):
                if answers:
                    self._open.wait()
                    if self._closed:
                        return
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self._closed = True
        self._open.set()
        self._listener.close()
        with self._lock:
            for s in self._socks:
                s.close()
