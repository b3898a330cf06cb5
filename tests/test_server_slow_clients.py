"""Slow and idle clients cannot hold the server: connections that send nothing, half a header, or sit idle after
an answer are closed within their timeout; one past the connection cap is refused at once; a body that does not
arrive is a 408; the API key (401) and the size limit (413) are checked before a body is read. Normal requests run
meanwhile as they do without them."""

import resource
import selectors
import socket
import statistics
import time

import httpx

from tests.serving import MODEL, running_server, serve_process

IDLE = 1000
HEADER_TIMEOUT, KEEP_ALIVE = 5.0, 1.0
CAP = IDLE + 100
REQUEST = {"model": MODEL, "prompt": "Hello", "max_tokens": 4, "ignore_eos": True}


def _allow_open_files(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        assert hard == resource.RLIM_INFINITY or hard >= wanted, f"ulimit -Hn is {hard}: the test needs {wanted}"
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def _latencies(client: httpx.Client, url: str, count: int = 6) -> list[float]:
    out = []
    for _ in range(count):
        start = time.monotonic()
        r = client.post(url + "/v1/completions", json=REQUEST)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
        out.append(time.monotonic() - start)
    return out


def _open(port: int, send: bytes) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port))
    if send:
        s.sendall(send)
    s.setblocking(False)
    return s


def _closed_by_server(s: socket.socket) -> bool:
    try:
        while data := s.recv(65536):
            if not data:
                break
        else:
            return True
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True
    return True


def _wait_closed(socks: list[socket.socket], deadline: float) -> dict[socket.socket, float]:
    """When each socket was closed by the server (until `deadline`)."""
    selector, closed = selectors.DefaultSelector(), {}
    for s in socks:
        selector.register(s, selectors.EVENT_READ)
    while len(closed) < len(socks) and time.monotonic() < deadline:
        for key, _ in selector.select(timeout=0.05):
            if _closed_by_server(key.fileobj):
                closed[key.fileobj] = time.monotonic()
                selector.unregister(key.fileobj)
    selector.close()
    return closed


def test_a_thousand_idle_connections_are_closed_in_time_and_hurt_no_request():
    _allow_open_files(2 * CAP + 256)
    options = ("--max-model-len", "128", "--timeout-header", str(HEADER_TIMEOUT), "--timeout-keep-alive",
               str(KEEP_ALIVE), "--max-connections", str(CAP))
    with serve_process(*options) as server, httpx.Client(timeout=60) as client:
        port = int(server.url.rsplit(":", 1)[1])
        before = _latencies(client, server.url)
        opened = time.monotonic()
        # Nothing sent, half a header, or an answer and then nothing (on keep-alive): a third each.
        sends = [b"", b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: appl",
                 b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n"]
        idle = [_open(port, sends[i % 3]) for i in range(IDLE)]
        beyond = [_open(port, b"") for _ in range(150)]
        refused = _wait_closed(beyond, time.monotonic() + 1.0)
        for s in beyond:
            s.close()
        meanwhile = _latencies(client, server.url, 3)
        assert time.monotonic() < opened + HEADER_TIMEOUT - 0.5  # the idle ones were open all along
        closed = _wait_closed(idle, opened + HEADER_TIMEOUT + 3.0)
        after = _latencies(client, server.url)
        for s in idle:
            s.close()
    assert len(closed) == IDLE, f"{IDLE - len(closed)} idle connections still open"
    answered = [closed[s] - opened for i, s in enumerate(idle) if i % 3 == 2]
    assert KEEP_ALIVE - 0.2 < min(answered) and max(answered) < HEADER_TIMEOUT - 0.5, (min(answered), max(answered))
    idle = [s for i, s in enumerate(idle) if i % 3 != 2]
    times = [closed[s] - opened for s in idle]
    assert HEADER_TIMEOUT - 0.2 < min(times) and max(times) < HEADER_TIMEOUT + 3.0, (min(times), max(times))
    assert len(refused) >= 40  # the connections past the cap: closed at once
    assert statistics.median(meanwhile) < 3 * statistics.median(before + after) + 0.2, (before, meanwhile, after)
    print(f"\n{len(idle)} silent connections closed {min(times):.2f}-{max(times):.2f} s after opening (timeout "
          f"{HEADER_TIMEOUT} s), {len(answered)} idle after an answer {min(answered):.2f}-{max(answered):.2f} s "
          f"(keep-alive {KEEP_ALIVE} s); {len(refused)} of 150 past the cap refused; request latency median "
          f"{statistics.median(before):.3f} s before, {statistics.median(meanwhile):.3f} s among them, "
          f"{statistics.median(after):.3f} s after")


def test_malformed_http_key_and_size_before_the_body_and_a_late_body_get_error_objects():
    with running_server(api_key="k", max_model_len=64, server={"timeout_header": 1.0}) as (url, _):
        port = int(url.rsplit(":", 1)[1])

        def answer(head: bytes, wait: float = 5.0, then: bytes = b"") -> tuple[bytes, float]:
            with socket.create_connection(("127.0.0.1", port)) as s:
                s.settimeout(wait)
                start = time.monotonic()
                s.sendall(head)
                if then:
                    time.sleep(0.2)
                    s.sendall(then)
                data = b""
                while b"\r\n\r\n" not in data or len(data.partition(b"\r\n\r\n")[2]) < int(
                        data.lower().partition(b"content-length: ")[2].split(b"\r\n")[0] or 0):
                    data += s.recv(65536)
                return data, time.monotonic() - start

        malformed, _ = answer(b"GET / HTTP/1.1 extra words\r\n\r\n")
        # A megabyte of header: refused at h11's 16 KB while most of it is still unread or unsent. The server must
        # read and drop the rest before it closes, or the kernel resets the connection under the client.
        huge_header, _ = answer(b"GET /health HTTP/1.1\r\nhost: x\r\nx-filler: " + b"a" * 1_000_000,
                                then=b"\r\n\r\n")
        head = b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        no_key, t_no_key = answer(head + b"content-length: 500\r\n\r\n{")
        too_big, t_too_big = answer(head + b"authorization: Bearer k\r\ncontent-length: 5000000\r\n\r\n{")
        late, t_late = answer(head + b"authorization: Bearer k\r\ncontent-length: 500\r\n\r\n{\"model\"")
    for bad in (malformed, huge_header):  # refused by the HTTP parser: an error object all the same
        assert bad.startswith(b"HTTP/1.1 400") and b'"invalid_request_error"' in bad, bad
    assert no_key.startswith(b"HTTP/1.1 401") and b'"invalid_api_key"' in no_key and t_no_key < 0.5
    assert too_big.startswith(b"HTTP/1.1 413") and b'"request_too_large"' in too_big and t_too_big < 0.5
    assert late.startswith(b"HTTP/1.1 408") and b'"request_timeout"' in late and 0.9 < t_late < 3
