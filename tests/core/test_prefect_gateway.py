"""Busy answers from a Prefect server are tried again soon, not after Prefect's 2-second backoff."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from resumable import prefect_gateway
from resumable.prefect_gateway import BUSY_RETRY_DELAYS, BusyRetryTransport


class BusyServer(ThreadingHTTPServer):
    """Answers 503 to the first `busy` requests, then 201; records every body it received."""

    def __init__(self, busy: int) -> None:
        super().__init__(("127.0.0.1", 0), BusyHandler)
        self.busy = busy
        self.bodies: list[bytes] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class BusyHandler(BaseHTTPRequestHandler):
    server: BusyServer

    def do_POST(self) -> None:
        self.server.bodies.append(self.rfile.read(int(self.headers["Content-Length"])))
        status = 503 if len(self.server.bodies) <= self.server.busy else 201
        body = (
            b'{"exception_message": "Service Unavailable"}' if status == 503 else b"{}"
        )
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    slept: list[float] = []
    monkeypatch.setattr(prefect_gateway.time, "sleep", slept.append)
    return slept


def serve(busy: int) -> Iterator[BusyServer]:
    server = BusyServer(busy)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def briefly_busy() -> Iterator[BusyServer]:
    yield from serve(busy=2)


@pytest.fixture
def always_busy() -> Iterator[BusyServer]:
    yield from serve(busy=10_000)


def test_a_busy_answer_is_sent_again_after_a_short_delay_with_the_same_body(
    briefly_busy: BusyServer, sleeps: list[float]
) -> None:
    with httpx.Client(transport=BusyRetryTransport()) as client:
        response = client.post(f"{briefly_busy.url}/api/x", json={"key": "resume:a:b"})

    assert response.status_code == 201
    assert sleeps == list(BUSY_RETRY_DELAYS[:2])
    assert briefly_busy.bodies == [b'{"key":"resume:a:b"}'] * 3


def test_a_server_that_stays_busy_is_answered_as_busy_for_prefects_client_to_back_off(
    always_busy: BusyServer, sleeps: list[float]
) -> None:
    with httpx.Client(transport=BusyRetryTransport()) as client:
        response = client.post(f"{always_busy.url}/api/x", json={})

    assert response.status_code == 503
    assert sleeps == list(BUSY_RETRY_DELAYS)
    assert len(always_busy.bodies) == len(BUSY_RETRY_DELAYS) + 1
