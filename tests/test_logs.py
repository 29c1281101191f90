"""groupsec.logs (JSON lines) and the metrics exporter's HTTP handling, in process."""

from __future__ import annotations

import io
import json
import logging

import trio
from prometheus_client.parser import text_string_to_metric_families

from groupsec.logs import setup_logging
from groupsec.metrics import ControllerCollector, make_registry, serve_metrics


def test_json_lines_carry_fields_extras_and_exceptions_but_never_bytes():
    buf = io.StringIO()
    setup_logging("json", logging.DEBUG, buf)
    try:
        log = logging.getLogger("groupsec.test")
        key = bytes(range(32))
        log.debug("rekey %s applied\nsecond line", "video", extra={"group": "video", "msg_id": 7, "key": key,
                                                                  "nested": {"k": [key]}})
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("failed")
        log.info("plain")
    finally:
        setup_logging("text", logging.WARNING)
    lines = buf.getvalue().splitlines()
    assert len(lines) == 3  # the embedded newline stays inside its JSON string
    docs = [json.loads(line) for line in lines]
    first = docs[0]
    assert first["level"] == "DEBUG"
    assert first["logger"] == "groupsec.test"
    assert first["message"] == "rekey video applied\nsecond line"
    assert first["group"] == "video"
    assert first["msg_id"] == 7
    assert first["key"] == "<32 bytes>"
    assert first["nested"] == {"k": ["<32 bytes>"]}
    assert key.hex() not in buf.getvalue()
    assert first["time"].endswith("+00:00")
    assert "T" in first["time"]
    assert docs[1]["level"] == "ERROR"
    assert "ValueError: boom" in docs[1]["exc"]
    assert set(docs[2]) == {"time", "level", "logger", "message"}


class FakeApp:
    def __init__(self) -> None:
        self.counters = {"registrations": 3, "refused-revoked": 2, "rekeys-sent": 5, "rekeys-kind-lkh": 2,
                         "tls-closed": 1}
        self.sessions: dict[str, set[object]] = {"a": {object()}}

        self.manager = type("Manager", (), {})()
        self.manager.counters = {"rollover-operator": 4}

    def status(self) -> dict:
        raise KeyError("no level state yet")  # like an HA follower: counters only


async def _http(port: int, request: bytes) -> bytes:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(request)
        out = b""
        while data := await stream.receive_some(65536):
            out += data
    return out


async def test_exporter_serves_metrics_and_refuses_other_requests():
    reg = make_registry(ControllerCollector(FakeApp()))
    async with trio.open_nursery() as n:
        port = await n.start(serve_metrics, reg, "127.0.0.1", 0)
        reply = await _http(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        head, _, body = reply.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ")
        assert f"Content-Length: {len(body)}".encode() in head
        fams = {f.name: f for f in text_string_to_metric_families(body.decode())}
        assert fams["groupsec_controller_registrations"].samples[0].value == 3
        refused = {s.labels["code"]: s.value for s in fams["groupsec_controller_registrations_refused"].samples}
        assert refused["revoked"] == 2
        assert refused["not-authorized"] == 0
        assert {s.labels["reason"]: s.value for s in fams["groupsec_controller_rollovers"].samples}["operator"] == 4
        assert fams["groupsec_controller_sessions"].samples[0].value == 1
        kinds = {s.labels["kind"]: s.value for s in fams["groupsec_controller_rekeys_sent"].samples}
        assert kinds == {"lkh": 2, "rekey": 0}
        assert "groupsec_controller_members" not in fams  # no level state: left out, scrape still works
        assert (await _http(port, b"HEAD /metrics HTTP/1.1\r\n\r\n")).endswith(b"\r\n\r\n")
        assert (await _http(port, b"POST /metrics HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 405 ")
        assert (await _http(port, b"GET /x HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 404 ")
        assert (await _http(port, b"\xff\x00garbage\r\n\r\n")).startswith(b"HTTP/1.1 400 ")
        assert (await _http(port, b"GET /metrics HTTP/1.1\r\n" + b"X: y\r\n" * 2000)).startswith(b"HTTP/1.1 431 ")
        n.cancel_scope.cancel()
