"""Service safety against a live ``bentoml serve`` (issue 16).

One server (with an API key) takes a corpus of 45 hostile files and 20 malformed
requests: every answer is a 4xx JSON ``{"error", "status"}``, never a 500 or a 200,
and ``/readyz`` stays 200. The same files through ``bonefrac predict`` get the same
verdicts. Then: no URL is ever fetched (SSRF), ``/metrics`` needs the key and 404 paths do
not grow it, conflicting credentials are a 400, and ``/readyz`` answers 503 within
a second while the model worker is killed. Two more servers: one that must refuse
to start without a key, one stopped with SIGTERM while requests are in flight.
"""

from __future__ import annotations

import http.server
import os
import signal
import threading
import time
from typing import ClassVar

import httpx
import pandas as pd
import psutil
import pytest
from tests._factories import make_png, phi_strings
from tests.integration._hostile import NAME_MARKER, hostile_files, valid_files
from tests.integration._server import make_tiny_bundle, running_server

from bonefrac.inference.batch_predict import predict_to_file
from bonefrac.registry.resolve import load_file
from bonefrac.serving.paths import UNKNOWN_PATH

pytestmark = [pytest.mark.integration, pytest.mark.long]

API_KEY = "safety-key-51d2"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    work = tmp_path_factory.mktemp("safety")
    model = make_tiny_bundle(work / "model.pt")
    with running_server(
        model,
        work,
        BONEFRAC_API_KEY=API_KEY,
        BONEFRAC_INSECURE_LOCAL="0",
        BONEFRAC_MAX_UPLOAD_MB="1",
        BONEFRAC_MAX_LATENCY_MS="20000",
        BONEFRAC_BACKEND="torch",
    ) as srv:
        yield srv, model


@pytest.fixture(scope="module")
def client(served):
    srv, _ = served
    with httpx.Client(base_url=srv.url, headers=AUTH, timeout=60) as c:
        yield c


def _assert_error(r: httpx.Response, label: str) -> None:
    assert r.status_code != 500, (label, r.text)
    assert 400 <= r.status_code < 500 or r.status_code == 503, (label, r.status_code, r.text)
    body = r.json()
    assert isinstance(body.get("error"), str) and len(body["error"]) > 3, (label, body)
    assert body.get("status") == r.status_code, (label, body)


def test_hostile_corpus_refused_live_and_by_the_cli(client, served, tmp_path):
    srv, model = served
    files = hostile_files(tmp_path / "make")
    controls = valid_files(tmp_path / "make")
    assert len(files) >= 40
    live: dict[str, int] = {}
    t0 = time.perf_counter()
    for i, (name, data) in enumerate({**files, **controls}.items()):
        endpoints = ("/predict", "/explain") if i % 5 == 0 else ("/predict",)
        for endpoint in endpoints:
            r = client.post(endpoint, files={"file": (f"{NAME_MARKER}_{name}", data, "application/octet-stream")})
            if name in controls:
                assert r.status_code == 200, (name, r.text)
            else:
                _assert_error(r, name)
                assert r.status_code < 500, (name, r.text)  # a bad file is the client's: 4xx, not 503
            live[name] = r.status_code
        assert client.get("/readyz").status_code == 200, name
    print(f"{len(files)} hostile + {len(controls)} valid files in {time.perf_counter() - t0:.1f} s")

    # The same files through `bonefrac predict`: one row per file, the same verdict.
    folder = tmp_path / "corpus"
    folder.mkdir()
    for name, data in {**files, **controls}.items():
        (folder / name).write_bytes(data)
    out = tmp_path / "p.csv"
    summary = predict_to_file(folder, load_file(model), out, backend="torch", progress=False)
    rows = pd.read_csv(out, keep_default_na=False)
    assert summary.n_total == len(rows) == len(files) + len(controls)
    cli = {os.path.basename(p): err for p, err in zip(rows["path"], rows["error"], strict=True)}
    disagree = {n: (live[n], cli[n]) for n in live if (live[n] == 200) != (cli[n] == "")}
    assert not disagree, disagree

    logs = srv.log_text()
    assert NAME_MARKER not in logs  # file names never logged
    assert "Traceback" not in logs
    for s in phi_strings():
        assert s not in logs, s


def _multipart(parts: list[bytes], boundary: bytes = b"b0undary") -> tuple[bytes, dict[str, str]]:
    body = b"".join(b"--" + boundary + b"\r\n" + p + b"\r\n" for p in parts) + b"--" + boundary + b"--\r\n"
    return body, {"content-type": f"multipart/form-data; boundary={boundary.decode()}"}


def _ct(value: str) -> dict[str, str]:
    return {"content-type": value}


def test_malformed_requests_get_4xx_json(client, tmp_path):
    png = make_png(tmp_path / "a.png").read_bytes()
    file_part = b'Content-Disposition: form-data; name="file"; filename="a.png"\r\n\r\n' + png
    text_part = b'Content-Disposition: form-data; name="file"\r\n\r\nnot a file'
    many_fields = [b'Content-Disposition: form-data; name="f%d"\r\n\r\nv' % i for i in range(1200)]
    two_files, ct2 = _multipart([file_part, file_part])
    no_file, ct3 = _multipart([b'Content-Disposition: form-data; name="other"; filename="a.png"\r\n\r\n' + png])
    text_file, ct4 = _multipart([text_part])
    many, ct5 = _multipart([file_part, *many_fields])
    bad_opacity, ct6 = _multipart([file_part, b'Content-Disposition: form-data; name="opacity"\r\n\r\nlots'])
    truncated, ct7 = _multipart([file_part])
    long_name = "x" * 400 + ".png"
    cases: list[tuple[str, str, dict]] = [
        ("urlencoded", "/predict", {"data": {"file": "abc"}}),
        ("urlencoded 1200 fields", "/predict", {"data": {f"k{i}": "v" for i in range(1200)}}),
        ("multipart without boundary", "/predict", {"content": png, "headers": _ct("multipart/form-data")}),
        ("multipart, bad boundary", "/predict", {"content": png, "headers": {"content-type": ct2["content-type"]}}),
        ("multipart without file", "/predict", {"content": no_file, "headers": ct3}),
        ("file as a text field", "/predict", {"content": text_file, "headers": ct4}),
        ("1200 multipart fields", "/predict", {"content": many, "headers": ct5}),
        ("two files", "/explain", {"content": two_files, "headers": ct2}),
        ("opacity not a number", "/explain", {"content": bad_opacity, "headers": ct6}),
        ("truncated multipart", "/predict", {"content": truncated[:-30], "headers": ct7}),
        ("json body", "/predict", {"json": {"file": "abc"}}),
        ("no content type", "/predict", {"content": png, "headers": {"content-type": ""}}),
        ("text/plain", "/predict", {"content": b"hello", "headers": {"content-type": "text/plain"}}),
        ("bentoml pickle", "/predict", {"content": b"\x80\x04N.", "headers": _ct("application/vnd.bentoml+pickle")}),
        ("raw body, not an image", "/predict", {"content": b"%PDF-1.4", "headers": _ct("application/octet-stream")}),
        ("long file name, bad file", "/predict", {"files": {"file": (long_name, b"GIF89a" + bytes(64))}}),
        ("chunked garbage", "/predict", {"content": iter([b"--x\r\n", b"garbage"]), "headers": ct7}),
        ("over the upload limit", "/predict", {"files": {"file": ("big.png", os.urandom(1_200_000))}}),
        ("GET on /predict", "/predict", {"method": "GET"}),
        ("unknown path", "/predict/../../etc/passwd", {"method": "GET"}),
    ]
    for label, path, kw in cases:
        method = kw.pop("method", "POST")
        r = client.request(method, path, **kw)
        _assert_error(r, label)
        assert client.get("/readyz").status_code == 200, label
    # What BentoML used to answer 500 to now works: a 400-character file name, a raw body.
    assert client.post("/predict", files={"file": (long_name, png)}).status_code == 200
    raw = client.post("/predict", content=png, headers={"content-type": "application/octet-stream"})
    assert raw.status_code == 200 and 0 <= raw.json()["probability"] <= 1
    r = client.post("/explain?opacity=0.2", content=png, headers={"content-type": "image/png"})
    assert r.status_code == 200 and "explanation" in r.json()


class _Recorder(http.server.BaseHTTPRequestHandler):
    hits: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        _Recorder.hits.append(self.path)
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"\x89PNG\r\n\x1a\n")

    def log_message(self, *args) -> None:
        pass


def test_no_url_is_ever_fetched(client):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}/x"
    try:
        body, ct = _multipart([f'Content-Disposition: form-data; name="file"\r\n\r\n{url}'.encode()])
        attempts = [
            client.post("/predict", content=body, headers=ct),
            client.post("/explain", content=body, headers=ct),
            client.post("/predict", data={"file": url}),
            client.post("/predict", json={"file": url}),
            client.post("/predict", content=url.encode(), headers={"content-type": "application/json"}),
            client.post("/predict", content=f'"{url}"'.encode(), headers={"content-type": "application/json"}),
        ]
        time.sleep(1.0)
        for r in attempts:
            _assert_error(r, url)
            assert r.status_code < 500
        assert _Recorder.hits == []
    finally:
        server.shutdown()


def test_metrics_need_the_key_and_404_paths_do_not_grow_them(served, client):
    """200 random 404 paths: no new series (the label is bounded at the source, not filtered on output)."""
    srv, _ = served
    assert httpx.get(f"{srv.url}/metrics").status_code == 401
    assert client.get("/probe-first").status_code == 404  # the one shared series exists from here on
    before = client.get("/metrics").text
    probes = [f"/probe-{i}-{os.urandom(4).hex()}" for i in range(200)]
    for p in probes:
        assert client.get(p).status_code == 404
    m = client.get("/metrics")
    assert m.status_code == 200 and "bentoml" in m.text
    assert not any(p in m.text for p in probes)
    assert 'endpoint="/predict"' in m.text and f'endpoint="{UNKNOWN_PATH}"' in m.text
    # Same series, new counts: a few digits longer at most (one series per random path added ~3.7 KB each).
    assert len(m.text) - len(before) < 2000, (len(before), len(m.text))


def test_conflicting_credentials_are_refused(served):
    srv, _ = served
    with httpx.Client(base_url=srv.url, timeout=30) as c:
        same = c.get("/metadata", headers=[("Authorization", f"Bearer {API_KEY}"), ("X-API-Key", API_KEY)])
        assert same.status_code == 200
        for headers in (
            [("Authorization", f"Bearer {API_KEY}"), ("Authorization", "Bearer other")],
            [("Authorization", f"Bearer {API_KEY}"), ("Authorization", f"Bearer {API_KEY}")],
            [("Authorization", f"Bearer {API_KEY}"), ("X-API-Key", "other")],
            [("Authorization", "Bearer other"), ("X-API-Key", API_KEY)],
            [("X-API-Key", API_KEY), ("X-API-Key", "other")],
        ):
            r = c.get("/metadata", headers=headers)
            assert r.status_code in (400, 401), (headers, r.status_code)
            _assert_error(r, str(headers))


def _model_worker(srv) -> psutil.Process:
    tree = psutil.Process(srv.proc.pid).children(recursive=True)
    found = [p for p in tree if "bonefrac_model" in " ".join(p.cmdline())]
    assert found, [" ".join(p.cmdline())[-200:] for p in tree]
    return found[0]


def test_readyz_answers_503_within_a_second_while_the_model_worker_is_down(served, client, tmp_path):
    """Runs last on the shared server: it kills the model worker and waits for its restart."""
    srv, _ = served
    worker = _model_worker(srv)
    os.kill(worker.pid, signal.SIGKILL)
    seen: list[tuple[int, float]] = []
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        t0 = time.perf_counter()
        try:
            status = httpx.get(f"{srv.url}/readyz", timeout=5).status_code
        except httpx.HTTPError:
            status = -1
        seen.append((status, time.perf_counter() - t0))
        if status == 200 and any(s == 503 for s, _ in seen):
            break
        time.sleep(0.2)
    not_ready = [(s, t) for s, t in seen if s != 200]
    assert not_ready and all(s == 503 for s, _ in not_ready), seen[:20]
    assert max(t for _, t in not_ready) < 1.0, sorted(t for _, t in not_ready)[-5:]
    assert seen[-1][0] == 200, "the model worker did not come back"
    r = client.post("/predict", files={"file": ("a.png", make_png(tmp_path / "a.png").read_bytes())})
    assert r.status_code == 200, r.text
    slowest = max(t for _, t in not_ready)
    print(f"/readyz while the model worker restarted: {len(not_ready)} x 503, slowest {slowest:.2f} s")


def test_refuses_to_start_without_a_key(tmp_path):
    model = make_tiny_bundle(tmp_path / "m.pt")
    t0 = time.perf_counter()
    with (
        pytest.raises(RuntimeError, match="BONEFRAC_INSECURE_LOCAL=1"),
        running_server(model, tmp_path / "w", timeout=120, BONEFRAC_INSECURE_LOCAL="0"),
    ):
        pass
    print(f"refused in {time.perf_counter() - t0:.1f} s")


def test_sigterm_lets_in_flight_requests_finish(tmp_path):
    """SIGTERM to the whole process group while requests are queued behind one decode slot: all complete."""
    model = make_tiny_bundle(tmp_path / "m.pt")
    big = make_png(tmp_path / "big.png", size=(2400, 2400), bit_depth=16).read_bytes()
    with running_server(
        model, tmp_path / "w", BONEFRAC_DECODE_SLOTS="1", BONEFRAC_BACKEND="torch", BONEFRAC_MAX_LATENCY_MS="20000"
    ) as srv:
        with httpx.Client(base_url=srv.url, timeout=60) as c:  # warm-up: model description, pools
            t0 = time.perf_counter()
            assert c.post("/predict", files={"file": ("b.png", big)}).status_code == 200
            one = time.perf_counter() - t0
        results: list[object] = []

        def call() -> None:
            try:
                r = httpx.post(f"{srv.url}/predict", files={"file": ("b.png", big)}, timeout=90)
                results.append(r.status_code)
            except httpx.HTTPError as err:
                results.append(type(err).__name__)

        threads = [threading.Thread(target=call) for _ in range(4)]
        for t in threads:
            t.start()
        # Long enough for the server to accept and read all four (a connection still in the
        # listen backlog at SIGTERM is refused, as for any server), short of finishing them.
        time.sleep(min(1.5, 1.5 * one))
        t_sig = time.perf_counter()
        os.killpg(srv.proc.pid, signal.SIGTERM)
        for t in threads:
            t.join(timeout=90)
        srv.proc.wait(timeout=40)
        took = time.perf_counter() - t_sig
    if results != [200] * 4:
        notes = [ln[:300] for ln in srv.log_text().splitlines() if "WARNING" in ln or "ERROR" in ln or "status=" in ln]
        print("\n".join(notes[-30:]))
    assert results == [200] * 4, results
    assert "draining (waiting for 1 front-end" in srv.log_text()  # it saw the front end it waits for
    print(f"one request {one:.2f} s; 4 in-flight requests drained; server exited {took:.1f} s after SIGTERM")
