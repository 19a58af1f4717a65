"""A TCP proxy in front of PostgreSQL that loses connections on purpose, for fault tests.

``FaultProxy`` listens on 127.0.0.1 (a free port) and relays every client connection to the
real server (TCP, or the unix socket when the host is a directory), framing the PostgreSQL v3
protocol as it goes: it answers SSLRequest/GSSENCRequest with ``N`` itself, forwards the
StartupMessage (reading ``application_name`` from it) and a CancelRequest as they are, then
reads type byte + int32 length messages. A fault is armed on the SQL text of a statement —
a simple Query, or a Bind whose text is that of its Parse (named or unnamed, remembered per
connection), so a prepared statement matches every time it is executed; a Parse on its own
(preparing, nothing executed) never triggers one. Extended-protocol messages are kept until
the Sync (or Flush) that ends their group and sent as one, so a group is dropped or sent whole:

* ``before``: the group (or Query) never reaches the server; both sockets are closed at once.
* ``after``: it is sent; the server's whole answer up to its ReadyForQuery, and anything more
  the client sends, is swallowed; then both sockets are closed. The server did run it.
* ``hold``: it is sent; the server's answer is held until ``fault.release(cut=...)``.

``Fault.fired`` is set just before both sockets are closed (``before``; ``after``, once the
server's answer is complete), or once the statement was sent (``hold``; ``Fault.answered`` is
set when its held answer is complete), so a client that saw the error sees it set.
Plain sockets and daemon threads; ``close()`` (or leaving the ``with``) ends everything.
"""

from __future__ import annotations

import contextlib
import re
import socket
import struct
import threading
from typing import Any
from urllib.parse import quote, urlencode

from psycopg.conninfo import conninfo_to_dict, make_conninfo

SSL_REQUEST, GSSENC_REQUEST, CANCEL_REQUEST = 80877103, 80877104, 80877102
POINTS = ("before", "after", "hold")
# Parse, Bind, Describe, Execute, Close: kept until the next other message (Sync, Flush...).
GROUPED = frozenset(b"PBDEC")
READY = ord("Z")
CONNECT_TIMEOUT_S = 10.0
URL = re.compile(r"^(postgres(?:ql)?)(\+\w+)?://")


class Fault:
    """One armed fault: it lets the first ``skip`` matching statements through, then triggers
    on the next ``times``."""

    def __init__(
        self, pattern: str, point: str, times: int, application_name: str | None, skip: int = 0
    ):
        if point not in POINTS:
            raise ValueError(f"point must be one of {POINTS}, not {point!r}")
        self.regex = re.compile(pattern, re.IGNORECASE | re.DOTALL)
        self.point = point
        self.remaining = times
        self.skip = skip
        self.application_name = application_name
        self.triggered = 0  # how many statements it caught so far
        self.fired = threading.Event()
        self.answered = threading.Event()  # hold: a held answer reached its ReadyForQuery
        self._released = threading.Event()
        self._cut = True

    def wait(self, timeout: float = 30.0) -> bool:
        return self.fired.wait(timeout)

    def release(self, cut: bool = True) -> None:
        """Hold only: ``cut`` closes both sockets once the answer is complete; otherwise the
        held bytes are forwarded and the connection goes on (later catches pass through)."""
        self._cut = cut
        self._released.set()

    def _matches(self, text: str, application_name: str) -> bool:
        if self.remaining <= 0 or self.regex.search(text) is None:
            return False
        wanted = self.application_name
        if wanted is not None and not application_name.startswith(wanted):
            return False
        if self.skip > 0:
            self.skip -= 1  # called under the proxy's lock
            return False
        return True


class _Link:
    """One proxied client connection and its upstream."""

    def __init__(self, client: socket.socket) -> None:
        self.client = client
        self.server: socket.socket | None = None
        self.application_name = ""
        self.statements: dict[bytes, str] = {}  # prepared statement name -> its SQL text
        self.fault: Fault | None = None  # caught a statement: its answer is swallowed or held
        self.swallow = False  # after "after" fired: the client's messages go nowhere
        self.closed = threading.Event()

    def close(self) -> None:
        self.closed.set()
        for sock in (self.client, self.server):
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                with contextlib.suppress(OSError):
                    sock.close()


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return bytes(data)


def _read_message(sock: socket.socket) -> tuple[int, bytes]:
    """One protocol message (type byte, the whole message with its header)."""
    head = _recv_exact(sock, 5)
    (length,) = struct.unpack("!i", head[1:])
    if length < 4:
        raise EOFError  # not the protocol: give up on this connection
    return head[0], head + _recv_exact(sock, length - 4)


class FaultProxy:
    """``with FaultProxy("127.0.0.1", 5432) as proxy:`` — see the module docstring."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self.connections = 0
        self._faults: list[Fault] = []
        self._links: set[_Link] = set()
        self._lock = threading.Lock()
        self._refusing = False
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._acceptor = threading.Thread(target=self._accept, daemon=True, name="faultproxy")
        self._acceptor.start()

    @classmethod
    def for_dsn(cls, dsn: str) -> FaultProxy:
        """A proxy in front of the (first) host and port that ``dsn`` names."""
        params = _params(dsn)[1]
        host = (params.get("hostaddr") or params.get("host") or "/tmp").split(",")[0]
        port = int((params.get("port") or "5432").split(",")[0])
        return cls(host, port)

    def dsn(self, dsn: str) -> str:
        """``dsn`` (in the same form: URL or key=value) pointed at the proxy, without SSL."""
        scheme, params = _params(dsn)
        params.pop("hostaddr", None)
        params.update(host="127.0.0.1", port=str(self.port), sslmode="disable")
        if scheme is None:
            return make_conninfo(**params)
        auth = ""
        if "user" in params:
            auth = quote(params.pop("user"), safe="")
            if "password" in params:
                auth += ":" + quote(params.pop("password"), safe="")
            auth += "@"
        host, port = params.pop("host"), params.pop("port")
        path = "/" + quote(params.pop("dbname"), safe="") if params.get("dbname") else ""
        params.pop("dbname", None)
        query = urlencode(params, quote_via=quote)
        return f"{scheme}://{auth}{host}:{port}{path}?{query}"

    def arm(
        self,
        pattern: str,
        point: str,
        *,
        times: int = 1,
        application_name: str | None = None,
        skip: int = 0,
    ) -> Fault:
        fault = Fault(pattern, point, times, application_name, skip)
        with self._lock:
            self._faults.append(fault)
        return fault

    def cut_all(self) -> None:
        with self._lock:
            links = list(self._links)
        for link in links:
            link.close()

    def refuse(self, on: bool = True) -> None:
        self._refusing = on

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self.cut_all()
        self._acceptor.join(timeout=5)

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the relay --------------------------------------------------------------------------

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            self.connections += 1
            if self._refusing:
                client.close()
                continue
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            link = _Link(client)
            with self._lock:
                self._links.add(link)
            threading.Thread(target=self._serve, args=(link,), daemon=True).start()

    def _connect_upstream(self) -> socket.socket:
        host, port = self.upstream_host, self.upstream_port
        if host.startswith("/"):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(CONNECT_TIMEOUT_S)
            sock.connect(f"{host}/.s.PGSQL.{port}")
        else:
            sock = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(None)
        return sock

    def _serve(self, link: _Link) -> None:
        try:
            if self._startup(link):
                threading.Thread(target=self._relay_answers, args=(link,), daemon=True).start()
                self._relay_requests(link)
        except (OSError, EOFError, ValueError):
            pass
        finally:
            link.close()
            with self._lock:
                self._links.discard(link)

    def _startup(self, link: _Link) -> bool:
        """Settle the untyped first packets; True once a session's startup was forwarded."""
        while True:
            head = _recv_exact(link.client, 8)
            length, code = struct.unpack("!ii", head)
            if not 8 <= length <= 10_000:
                raise ValueError("not a PostgreSQL startup packet")
            body = _recv_exact(link.client, length - 8)
            if code in (SSL_REQUEST, GSSENC_REQUEST):
                link.client.sendall(b"N")  # no encryption here: the client goes on in clear
                continue
            link.server = self._connect_upstream()
            link.server.sendall(head + body)
            if code == CANCEL_REQUEST:
                link.server.settimeout(CONNECT_TIMEOUT_S)
                with contextlib.suppress(OSError):
                    link.server.recv(1)  # the server closes it once it has read the request
                return False
            fields = body.split(b"\0")
            values = dict(zip(fields[0::2], fields[1::2], strict=False))
            link.application_name = values.get(b"application_name", b"").decode(errors="replace")
            return True

    def _catch(self, link: _Link, kind: int, message: bytes) -> Fault | None:
        """The fault a Query or Bind triggers; a Parse only teaches us its statement's text."""
        body = message[5:]
        if kind == ord("P"):
            name, rest = body.split(b"\0", 1)
            link.statements[name] = rest.split(b"\0", 1)[0].decode(errors="replace")
            return None
        if kind == ord("Q"):
            text: str | None = body.split(b"\0", 1)[0].decode(errors="replace")
        elif kind == ord("B"):
            text = link.statements.get(body.split(b"\0", 2)[1])
        else:
            return None
        if text is None:
            return None
        with self._lock:
            for fault in self._faults:
                if fault._matches(text, link.application_name):
                    fault.remaining -= 1
                    fault.triggered += 1
                    return fault
        return None

    def _relay_requests(self, link: _Link) -> None:
        assert link.server is not None
        group: list[bytes] = []
        caught: Fault | None = None
        while True:
            kind, message = _read_message(link.client)
            if link.swallow:
                continue
            fault = self._catch(link, kind, message)
            if fault is not None and fault.point == "before":
                fault.fired.set()
                link.close()
                return
            if fault is not None:
                caught = link.fault = fault  # before sending: the next answer is the server's
            group.append(message)
            if kind in GROUPED:
                continue
            link.server.sendall(b"".join(group))
            group.clear()
            if caught is not None:
                if caught.point == "after":
                    link.swallow = True
                else:
                    caught.fired.set()
                caught = None

    def _relay_answers(self, link: _Link) -> None:
        assert link.server is not None
        held: list[bytes] = []
        try:
            while True:
                kind, message = _read_message(link.server)
                fault = link.fault
                if fault is None:
                    link.client.sendall(message)
                elif fault.point == "after":
                    if kind == READY:
                        fault.fired.set()
                        link.close()
                        return
                else:
                    held.append(message)
                    if kind == READY:
                        fault.answered.set()
                        while not fault._released.wait(0.1):
                            if link.closed.is_set():
                                return
                    if fault._released.is_set():
                        if fault._cut:
                            if kind == READY:
                                link.close()
                                return
                            continue
                        link.client.sendall(b"".join(held))
                        held.clear()
                        link.fault = None
        except (OSError, EOFError):
            pass
        finally:
            link.close()


def _params(dsn: str) -> tuple[str | None, dict[str, Any]]:
    """(URL scheme, or None for key=value) and the connection parameters of ``dsn``."""
    found = URL.match(dsn)
    if found is None:
        return None, conninfo_to_dict(dsn)
    scheme = found.group(0)[:-3]
    return scheme, conninfo_to_dict(found.group(1) + dsn[len(scheme) :])
