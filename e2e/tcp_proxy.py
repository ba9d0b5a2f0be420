"""A small round-robin TCP proxy standing in for a load balancer (stdlib only).

Each accepted connection goes to the next backend in turn; a backend that
refuses the connection (a killed replica) is skipped for the next one, as a
load balancer's failed health check would. Bytes are copied both ways until
either side closes. Used by e2e/test_replicas.py:

    proxy = RoundRobinProxy([("127.0.0.1", 8081), ("127.0.0.1", 8082)])
    proxy.start(); ... proxy.url ...; proxy.stop()
"""

import itertools
import socket
import threading


class RoundRobinProxy:
    def __init__(self, backends):
        self.backends = list(backends)
        self._turn = itertools.count()
        self._turn_lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.connections = [0] * len(self.backends)  # accepted connections per backend
        self._open = set()
        self._stopping = False

    def start(self):
        threading.Thread(target=self._accept, name="proxy-accept", daemon=True).start()

    def stop(self):
        self._stopping = True
        self._listener.close()
        for sock in list(self._open):
            _close(sock)

    def _accept(self):
        while not self._stopping:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _connect(self):
        """Connect to the next backend that accepts; None if none does."""
        with self._turn_lock:
            first = next(self._turn)
        for i in range(len(self.backends)):
            index = (first + i) % len(self.backends)
            try:
                upstream = socket.create_connection(self.backends[index], timeout=5)
            except OSError:
                continue
            upstream.settimeout(None)
            self.connections[index] += 1
            return upstream
        return None

    def _serve(self, client):
        upstream = self._connect()
        if upstream is None:
            _close(client)
            return
        self._open.update((client, upstream))
        threading.Thread(target=self._pipe, args=(upstream, client), daemon=True).start()
        self._pipe(client, upstream)

    def _pipe(self, src, dst):
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:  # one side gone: close both, the client sees the connection end
            for sock in (src, dst):
                self._open.discard(sock)
                _close(sock)


def _close(sock):
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
