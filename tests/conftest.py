"""Shared fixtures: a real S3 endpoint on loopback (moto's server mode, spoken to over HTTP)."""

import uuid

import boto3
import pytest
from moto.server import ThreadedMotoServer


@pytest.fixture(scope="session")
def s3_endpoint():
    """Start an S3-compatible server on 127.0.0.1 and point the AWS environment at it."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AWS_ENDPOINT_URL", endpoint)
        patch.setenv("AWS_ACCESS_KEY_ID", "testing")
        patch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        patch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        patch.delenv("AWS_PROFILE", raising=False)
        yield endpoint
    server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint):
    """A fresh, empty bucket on the loopback endpoint, as `s3://<bucket>`."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return f"s3://{name}"


class FaultProxy:
    """An HTTP proxy between a client and the S3 endpoint that injects failures.

    `faults` is consumed one request at a time: "503" answers with S3's SlowDown error, "drop"
    closes the connection without an answer, "pass" forwards. When it is empty, `then` decides
    ("pass", or a fault to repeat forever). `seen` counts requests.
    """

    def __init__(self, upstream: str, faults=(), then="pass"):
        import http.client
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        from urllib.parse import urlparse

        self.faults, self.then, self.seen = list(faults), then, 0
        self.lock = threading.Lock()
        target = urlparse(upstream)
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while (size := int(self.rfile.readline().split(b";")[0], 16)) > 0:
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                    while self.rfile.readline() not in (b"\r\n", b""):
                        pass
                    return b"".join(chunks)
                return self.rfile.read(int(self.headers.get("Content-Length", 0)))

            def _handle(self):
                body = self._body()
                fault = proxy.next_fault()
                if fault == "drop":
                    self.close_connection = True
                    self.connection.close()
                    return
                if fault == "503":
                    error = b"<Error><Code>SlowDown</Code><Message>injected</Message></Error>"
                    self.send_response(503)
                    self.send_header("Content-Length", str(len(error)))
                    self.end_headers()
                    self.wfile.write(error)
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() != "transfer-encoding"}
                headers["Content-Length"] = str(len(body))
                connection = http.client.HTTPConnection(target.hostname, target.port, timeout=30)
                connection.request(self.command, self.path, body=body, headers=headers)
                answer = connection.getresponse()
                data = answer.read()
                self.send_response(answer.status)
                for key, value in answer.getheaders():
                    if key.lower() not in ("transfer-encoding", "content-length", "connection"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                connection.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def next_fault(self) -> str:
        with self.lock:
            self.seen += 1
            return self.faults.pop(0) if self.faults else self.then

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fault_proxy(s3_endpoint, monkeypatch):
    """Make a FaultProxy in front of the S3 endpoint and point AWS_ENDPOINT_URL at it."""
    proxies = []

    def make(faults=(), then="pass"):
        proxy = FaultProxy(s3_endpoint, faults, then)
        proxies.append(proxy)
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        return proxy

    yield make
    for proxy in proxies:
        proxy.close()
