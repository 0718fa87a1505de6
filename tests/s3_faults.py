"""A fault-injecting proxy in front of the moto S3 server (a test double for faults a real
object store shows only at random): real HTTP, every request forwarded to moto unless the proxy
answers it with a fault.

    with FaultyS3(moto_endpoint, every=5) as proxy:      # every 5th request: 500, 503, SlowDown
        os.environ["AWS_ENDPOINT_URL"] = proxy.url
    proxy.refuse_writes = True                           # from now on PUT/POST/DELETE: 403

Faults rotate through 500 InternalError, 503 SlowDown and 503 ServiceUnavailable, S3's own XML
error bodies, so botocore sees what S3 sends. `every=5` fails 20% of requests, never two in a
row, so a client that retries always gets through: a test of retrying, not of luck.
"""

from __future__ import annotations

import http.client
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

FAULTS = [
    (500, "InternalError", "We encountered an internal error. Please try again."),
    (503, "SlowDown", "Please reduce your request rate."),
    (503, "ServiceUnavailable", "Service is unable to handle request."),
]
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade"}


def s3_error(code: str, message: str) -> bytes:
    return (
        f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
        f"<Message>{message}</Message><RequestId>fault</RequestId></Error>"
    ).encode()


class FaultyS3:
    def __init__(self, upstream: str, every: int = 0) -> None:
        self.upstream = urlsplit(upstream)
        self.every = every  # 0: no faults
        self.refuse_writes = False
        self.counts: Counter = Counter()
        self._lock = threading.Lock()
        self._requests = 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                fault = proxy._fault(self.command)
                if fault is not None:
                    status, code, message = fault
                    self._reply(
                        status, {"Content-Type": "application/xml"}, s3_error(code, message)
                    )
                    return
                connection = http.client.HTTPConnection(
                    proxy.upstream.hostname, proxy.upstream.port, timeout=60
                )
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                headers.pop("Expect", None)
                connection.request(self.command, self.path, body=body, headers=headers)
                response = connection.getresponse()
                data = response.read()
                kept = {
                    k: v
                    for k, v in response.getheaders()
                    if k.lower() not in HOP_BY_HOP and k.lower() != "content-length"
                }
                # A HEAD answer has no body but the object's length (s3fs sizes files by it).
                length = response.getheader("Content-Length") if self.command == "HEAD" else None
                connection.close()
                self._reply(response.status, kept, data, length)

            def _reply(
                self, status: int, headers: dict, data: bytes, length: str | None = None
            ) -> None:
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", length or str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def _fault(self, method: str) -> tuple[int, str, str] | None:
        with self._lock:
            self._requests += 1
            self.counts["requests"] += 1
            if self.refuse_writes and method in ("PUT", "POST", "DELETE"):
                self.counts["refused"] += 1
                return 403, "AccessDenied", "Access Denied"
            if self.every and self._requests % self.every == 0:
                fault = FAULTS[(self._requests // self.every) % len(FAULTS)]
                self.counts[fault[1]] += 1
                return fault
        return None

    def __enter__(self) -> FaultyS3:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
