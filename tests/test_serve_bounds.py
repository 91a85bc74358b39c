"""retrieve serve bounded under load, through a real socket (the app on uvicorn on a loopback port, in this
process so that a test can slow a drawing down): a chunked upload with no Content-Length is refused once past the
cap and the server stays up; parameters past their caps are a 400 naming the limit; a search is answered while an
explanation is drawn or computed (the event loop and the searches are never held by it); uploads are decoded a few
at a time and kept within a byte budget, the oldest dropped first."""
from __future__ import annotations

import concurrent.futures
import os
import select
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
from servetools import Client

pytest.importorskip("starlette", reason="the serve extra is not installed (pip install -e '.[serve]')")
pytest.importorskip("uvicorn", reason="the serve extra is not installed (pip install -e '.[serve]')")

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "data" / "samples"
PHOTOS = ("chelsea.png", "chelsea_crop_flipped.jpg", "coffee.png", "rocket.jpg", "camera.png")
CAP = 1_000_000  # the server's upload cap here (--max-upload-mb 1)


class Live(Client):
    """The app ``retrieve serve`` runs, on uvicorn on a free loopback port, in a thread of this process."""

    def __init__(self, service):
        import uvicorn

        from web.app import create_app
        from web.server import bind

        self.service = service
        self.sock = bind("127.0.0.1", 0)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/"
        config = uvicorn.Config(create_app(service), log_level="warning", access_log=False, lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        assert self.server.started

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    from indexer import index_paths
    from web.service import Service

    base = tmp_path_factory.mktemp("serve_bounds")
    photos = base / "photos"
    photos.mkdir()
    for name in PHOTOS:
        shutil.copy(SAMPLES / name, photos / name)
    index_paths([str(photos)], base / "index")
    c = Service(base / "index", cache_dir=base / "cache", max_upload_bytes=CAP)
    server = Live(c)
    yield server, photos
    server.stop()
    c.close()


def _ids(live) -> dict[str, int]:
    status, d = live.json("api/images?limit=100")
    return {i["name"]: i["id"] for i in d["images"]}


def _chunked_post(port: int, path: str, ctype: str, first: bytes, most: int) -> tuple[bytes, int]:
    """POST a chunked body (``first``, then random bytes, up to ``most`` in all) with no Content-Length, stopping as
    soon as an answer arrives: (the answer's first bytes, the bytes sent before it)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.sendall((f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: {ctype}\r\n"
               "Transfer-Encoding: chunked\r\n\r\n").encode())
    sent, block, answer = 0, os.urandom(65536), b""
    s.setblocking(False)
    try:
        chunk = first
        pending = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            readable, writable, _ = select.select([s], [s] if pending else [], [], 1)
            if readable:
                try:
                    data = s.recv(65536)
                except (ConnectionResetError, BlockingIOError):
                    data = b""
                answer += data
                if not data or b"\r\n\r\n" in answer:
                    break
            if writable and pending:
                try:
                    n = s.send(pending)
                except (BrokenPipeError, ConnectionResetError):
                    pending = b""
                    continue
                pending = pending[n:]
                sent += n
                if not pending and sent < most:
                    pending = f"{len(block):x}\r\n".encode() + block + b"\r\n"
                elif not pending:
                    pending = b"0\r\n\r\n"
        s.setblocking(True)
        s.settimeout(10)
        try:
            while not _complete(answer):
                data = s.recv(65536)
                if not data:
                    break
                answer += data
        except (OSError, socket.timeout):
            pass
    finally:
        s.close()
    return answer, sent


def _complete(answer: bytes) -> bool:
    head, sep, body = answer.partition(b"\r\n\r\n")
    if not sep:
        return False
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    return len(body) >= length


@pytest.mark.parametrize("kind", ["multipart", "raw"])
def test_a_chunked_upload_without_length_past_the_cap_is_refused_at_once(live, kind):
    server, _ = live
    if kind == "multipart":
        head = (b"--XyZ\r\nContent-Disposition: form-data; name=\"image\"; filename=\"big.jpg\"\r\n"
                b"Content-Type: image/jpeg\r\n\r\n")
        answer, sent = _chunked_post(server.port, "/api/upload", "multipart/form-data; boundary=XyZ", head,
                                     40 * CAP)
    else:
        answer, sent = _chunked_post(server.port, "/api/search?k=3", "image/jpeg", b"\xff\xd8", 40 * CAP)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"limit" in answer
    # refused once past the cap: not after reading all 40 MB (the socket buffers hold a few MB at most)
    assert sent < 20 * CAP, sent
    assert server.request("api/health")[0] == 200  # and the server is still up
    assert server.service._receiving == 0  # every byte counted in is counted out


def test_parameters_past_their_caps_are_a_400_naming_the_limit(live):
    server, _ = live
    i = _ids(server)["coffee.png"]
    for query, limit in ((f"api/search?q={i}&k=101", "100"), (f"api/search?q={i}&k=10&offset=995", "1000"),
                         (f"api/search?q={i}&verify=101", "100"), (f"api/search?q={i}&verify=1000", "100"),
                         (f"api/search?q={i}&qe=101", "100"), ("api/images?limit=501", "500")):
        status, d = server.json(query)
        assert status == 400, (query, status, d)
        assert limit in d["error"] and "\n" not in d["error"], (query, d)
    # what the search page asks for is within them
    for query in (f"api/search?q={i}&k=100&offset=900", f"api/search?q={i}&k=10&verify=60&qe=100",
                  "api/images?offset=0&limit=24"):
        assert server.request(query)[0] == 200, query


def _slowed(monkeypatch, service, seconds: float) -> None:
    """Every figure and report drawn ``seconds`` later (a slow drawing, as of a large pair on a busy machine)."""
    submit = service._render_pool.submit

    def slow_submit(fn, *a, **kw):
        def late():
            time.sleep(seconds)
            return fn(*a, **kw)
        return submit(late)

    monkeypatch.setattr(service._render_pool, "submit", slow_submit)


def test_a_search_is_answered_while_an_explanation_is_drawn(live, monkeypatch):
    """A download of a report waits for its drawing; meanwhile the event loop answers a search at once."""
    server, _ = live
    ids = _ids(server)
    cat, rocket = ids["chelsea.png"], ids["rocket.jpg"]
    _slowed(monkeypatch, server.service, 3.0)
    status, doc = server.json(f"api/explain?q={cat}&r={rocket}&method=gradcam")
    assert status == 200, doc
    done = {}

    def download():
        t = time.perf_counter()
        done["status"], _ = server.request(doc["downloads"]["report"])
        done["at"] = time.perf_counter()
        done["seconds"] = done["at"] - t

    waiting = threading.Thread(target=download)
    waiting.start()
    time.sleep(0.3)  # the download is waiting for the drawing now
    t = time.perf_counter()
    status, found = server.json(f"api/search?q={cat}&k=3")
    answered = time.perf_counter()
    waiting.join(60)
    assert status == 200 and found["results"]
    assert answered - t < 1.0, f"a search took {answered - t:.2f} s while a report was being drawn"
    assert done["status"] == 200 and done["seconds"] > 2.0 and answered < done["at"]


def test_a_search_is_not_queued_behind_an_explanation(live, monkeypatch):
    """An explanation being computed holds the explainers, not the searches."""
    server, _ = live
    ids = _ids(server)
    cat, coffee = ids["chelsea.png"], ids["coffee.png"]
    c = server.service
    compute = c._explain_files

    def slow_compute(*a, **kw):
        time.sleep(2.5)
        return compute(*a, **kw)

    monkeypatch.setattr(c, "_explain_files", slow_compute)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        started = time.perf_counter()
        explained = pool.submit(server.json, f"api/explain?q={coffee}&r={cat}&method=gradcam")
        time.sleep(0.3)
        t = time.perf_counter()
        status, found = server.json(f"api/search?q={cat}&k=3")
        took = time.perf_counter() - t
        status_e, doc = explained.result(60)
    assert status == 200 and status_e == 200, doc
    assert took < 1.0, f"a search took {took:.2f} s while an explanation was computed"
    assert time.perf_counter() - started > 2.5


def _photo_bytes(i: int) -> bytes:
    """A distinct small JPEG (a crop of the coffee photo) per ``i``."""
    import io

    from PIL import Image

    im = Image.open(SAMPLES / "coffee.png").convert("RGB").crop((i * 7, 0, 300 + i * 7, 250))
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def test_kept_uploads_stay_within_their_byte_budget_oldest_dropped(live, monkeypatch):
    server, _ = live
    c = server.service
    monkeypatch.setattr(c, "keep_upload_bytes", 150_000)
    tokens = []
    for i in range(8):
        status, d = server.json("api/upload", _photo_bytes(i), {"Content-Type": "image/jpeg"})
        assert status == 200, d
        tokens.append(d["token"])
        n, kept = c.kept_uploads()
        assert kept <= 150_000 or n == 1
        assert sum(f.stat().st_size for f in c.upload_dir.iterdir()) == kept  # what is counted is what is there
    n, _ = c.kept_uploads()
    assert 1 <= n < 8
    for old in tokens[:8 - n]:  # the oldest are gone, with their files
        assert server.json(f"api/search?q=upload:{old}")[0] == 404
        assert server.request(f"upload/{old}/thumb.jpg")[0] == 404
        assert not list(c.upload_dir.glob(f"{old}*"))
    for new in tokens[8 - n:]:
        assert server.json(f"api/search?q=upload:{new}&k=2")[0] == 200


def test_uploads_are_decoded_a_few_at_a_time(live, monkeypatch):
    """Eight uploads at once: at most ``decode_slots()`` decoded together."""
    import retrieval.images
    from web.service import decode_slots

    server, _ = live
    decode = retrieval.images.decode_image
    now, most, lock = [0], [0], threading.Lock()

    def counted(*a, **kw):
        with lock:
            now[0] += 1
            most[0] = max(most[0], now[0])
        try:
            time.sleep(0.2)
            return decode(*a, **kw)
        finally:
            with lock:
                now[0] -= 1

    monkeypatch.setattr(retrieval.images, "decode_image", counted)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda i: server.json("api/upload", _photo_bytes(20 + i),
                                                      {"Content-Type": "image/jpeg"}), range(8)))
    assert all(status == 200 for status, _ in answers), answers
    assert 1 <= most[0] <= decode_slots(), most[0]


def test_uploads_beyond_the_bytes_in_flight_are_busy_not_queued(live, monkeypatch):
    server, _ = live
    monkeypatch.setattr(server.service, "uploads_in_flight", 10_000)
    status, d = server.json("api/upload", _photo_bytes(30), {"Content-Type": "image/jpeg"})
    assert status == 503 and "try again" in d["error"], d
    assert server.service._receiving == 0


def test_thumbnails_are_cached_at_a_few_sizes(live):
    """Whatever size is asked for, a photo's thumbnails are made at one of a few sides (rounded up): a client cannot
    fill the disk cache with one file per pixel size."""
    import io

    from PIL import Image

    from web.service import THUMB_SIDES

    server, _ = live
    i = _ids(server)["rocket.jpg"]  # 640 × 427
    sides = {}
    for size in (64, 65, 100, 127, 128, 129, 200, 300, 511, 700, 1000, 1024):
        status, body = server.request(f"thumb/{i}?size={size}")
        assert status == 200
        sides[size] = max(Image.open(io.BytesIO(body)).size)
    assert sides[65] == sides[100] == sides[127] == sides[128] == 128 and sides[129] == sides[200] == 256
    assert sides[700] == sides[1000] == 640  # never larger than the photo
    sha = server.service.row(i).sha256
    made = list((server.service.cache_dir / "thumbs").glob(f"{sha}_*.jpg"))
    assert len(made) <= len(THUMB_SIDES)
    for size in (63, 1025):
        status, body = server.request(f"thumb/{i}?size={size}")
        assert status == 400 and b"size" in body


def test_many_explanations_waiting_do_not_take_the_searches_threads(live, monkeypatch):
    """More explanation requests than the server has worker threads (anyio's 40), each slowed: they wait their turn
    without holding a thread, and a search is answered at once meanwhile."""
    server, _ = live
    ids = _ids(server)
    c = server.service
    compute = c._explain_files

    def slow_compute(*a, **kw):
        time.sleep(0.5)
        return compute(*a, **kw)

    monkeypatch.setattr(c, "_explain_files", slow_compute)
    pairs = [(q, r, m) for q in ids.values() for r in ids.values() if q != r for m in ("sfam", "gradcam")][:40]
    assert len(pairs) == 40
    with concurrent.futures.ThreadPoolExecutor(len(pairs)) as pool:
        jobs = [pool.submit(server.json, f"api/explain?q={q}&r={r}&method={m}") for q, r, m in pairs]
        time.sleep(1.5)  # every request is in: a few computing or waiting in threads, the rest on the event loop
        t = time.perf_counter()
        status, found = server.json(f"api/search?q={ids['chelsea.png']}&k=3")
        took = time.perf_counter() - t
        pending = sum(not j.done() for j in jobs)
        answers = [j.result(120) for j in jobs]
    assert status == 200 and found["results"]
    assert pending > 20, "the explanations were answered too fast for the test to mean anything"
    assert took < 1.0, f"a search took {took:.2f} s behind {pending} explanations waiting"
    assert all(s == 200 for s, _ in answers), [d for s, d in answers if s != 200][:2]
