"""A TCP relay in front of a real server that a test can take down and bring back: the object
store "blinks" for real (connections refused or cut mid-request), with no client code patched."""

import socket
import threading
from contextlib import suppress


class Outage:
    """Relays 127.0.0.1:<port> to ``target`` (host, port) while up; while down, every new
    connection is closed at once and the open ones are cut."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.down = False
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    @classmethod
    def in_front_of(cls, url: str) -> "Outage":
        host, port = url.split("://", 1)[-1].rstrip("/").rsplit(":", 1)
        return cls((host, int(port)))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def go_down(self) -> None:
        self.down = True
        with self._lock:
            for sock in self._open:
                with suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def come_back(self) -> None:
        self.down = False

    def close(self) -> None:
        self.go_down()
        with suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept thread
        self._listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            if self.down:
                client.close()
                continue
            try:
                server = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            with self._lock:
                if self.down:  # it went down while this one connected
                    client.close()
                    server.close()
                    continue
                self._open.update((client, server))
            for source, sink in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while chunk := source.recv(1 << 16):
                sink.sendall(chunk)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            with self._lock:
                self._open.discard(source)
            source.close()
