"""retrieve serve's JSON API through Starlette's test client: the same answers as the CLI, clear 4xx errors,
no file outside the index, uploads capped, and answers from the last committed state while an indexing run
updates the index."""
from __future__ import annotations

import io
import os
import shutil
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("starlette", reason="the serve extra is not installed (pip install -e '.[serve]')")
pytest.importorskip("httpx", reason="Starlette's test client needs httpx (pip install -e '.[test]')")

from clitools import run, run_json  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # starlette.testclient on httpx

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "data" / "samples"
PHOTOS = ("chelsea.png", "chelsea_crop_flipped.jpg", "coffee.png", "rocket.jpg", "camera.png")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Five sample photos indexed in a temp folder, a Service over them and a test client that sends the token
    (as a script would: tests/test_web_security.py checks the guard itself over a real socket)."""
    from starlette.testclient import TestClient

    from indexer import index_paths
    from web.app import create_app
    from web.security import Guard
    from web.service import Service

    base = tmp_path_factory.mktemp("serve")
    photos = base / "photos"
    photos.mkdir()
    for name in PHOTOS:
        shutil.copy(SAMPLES / name, photos / name)
    index = base / "index"
    index_paths([str(photos)], index)
    c = Service(index, cache_dir=base / "cache")
    guard = Guard.for_address("127.0.0.1")
    client = TestClient(create_app(c, guard), base_url="http://127.0.0.1:8000", raise_server_exceptions=False,
                        headers={"Authorization": f"token {guard.token}"})
    yield c, client, photos, index, base
    c.close()


def _id_of(client, name: str) -> int:
    ims = client.get("/api/images?limit=100").json()["images"]
    return next(i["id"] for i in ims if i["name"] == name)


def test_health_and_info_have_the_cli_fields(served):
    c, client, photos, index, _ = served
    h = client.get("/api/health")
    assert h.status_code == 200 and h.json()["status"] == "ok" and h.json()["images"] == len(PHOTOS)
    info = client.get("/api/info").json()
    cli = run_json("info", "--index", str(index))
    assert set(info) == set(cli)
    for k in ("index", "model", "metric", "dim", "images", "input_size", "index_type"):
        assert info[k] == cli[k], k


def test_search_by_id_matches_the_cli(served):
    c, client, photos, index, _ = served
    cat = _id_of(client, "chelsea.png")
    r = client.get(f"/api/search?q={cat}&k=3")
    assert r.status_code == 200, r.text
    d = r.json()
    cli = run_json("search", str(photos / "chelsea.png"), "--index", str(index), "-k", "3")
    assert [h["id"] for h in d["results"]] == [h["id"] for h in cli["results"]]
    assert [h["score"] for h in d["results"]] == pytest.approx([h["score"] for h in cli["results"]], abs=1e-5)
    for h, hc in zip(d["results"], cli["results"]):
        assert set(hc) <= set(h)  # the CLI's fields, plus what the page needs
        assert h["verdict"]["headline"] and h["thumb"].startswith(f"/thumb/{h['id']}?")
    assert d["results"][0]["name"] == "chelsea_crop_flipped.jpg"  # the crop of the same cat, itself left out
    assert cat not in [h["id"] for h in d["results"]]


def test_upload_search_paging_and_qe(served):
    c, client, photos, index, _ = served
    data = (SAMPLES / "chelsea_crop_flipped.jpg").read_bytes()
    up = client.post("/api/upload", files={"image": ("my <b>cat</b>.jpg", data, "image/jpeg")})
    assert up.status_code == 200, up.text
    q = "upload:" + up.json()["token"]
    p1 = client.get(f"/api/search?q={q}&k=2").json()
    p2 = client.get(f"/api/search?q={q}&k=2&offset=2").json()
    assert [h["rank"] for h in p1["results"]] == [1, 2] and [h["rank"] for h in p2["results"]] == [3, 4]
    allk = client.get(f"/api/search?q={q}&k=4").json()
    assert [h["id"] for h in p1["results"] + p2["results"]] == [h["id"] for h in allk["results"]]
    assert p1["more"] is True
    # an upload is not in the index: its identical twin comes first, at score 1
    assert allk["results"][0]["name"] == "chelsea_crop_flipped.jpg"
    assert allk["results"][0]["score"] == pytest.approx(1.0, abs=1e-4)
    qe = client.get(f"/api/search?q={q}&k=3&qe=1").json()
    assert qe["qe"] == 1 and len(qe["results"]) == 3
    # the photo as the raw body of a POST works too (curl --data-binary)
    raw = client.post("/api/search?k=2", content=data, headers={"content-type": "image/jpeg"})
    assert raw.status_code == 200 and raw.json()["results"][0]["id"] == allk["results"][0]["id"]


def test_verify_adds_inliers(served):
    c, client, photos, index, _ = served
    data = (SAMPLES / "coffee.png").read_bytes()
    d = client.post("/api/search?k=2&verify=4", files={"image": ("coffee.png", data, "image/png")}).json()
    assert all("inliers" in h for h in d["results"])
    assert d["results"][0]["name"] == "coffee.png" and d["results"][0]["inliers"] >= 10
    assert d["results"][0]["verdict"]["confirmed"] is True
    assert "same object confirmed" in d["results"][0]["verdict"]["text"]


def test_explain_matches_search_and_cli(served):
    c, client, photos, index, base = served
    cat, crop = _id_of(client, "chelsea.png"), _id_of(client, "chelsea_crop_flipped.jpg")
    s = client.get(f"/api/search?q={cat}&k=1").json()["results"][0]
    r = client.get(f"/api/explain?q={cat}&r={crop}&verify=1")
    assert r.status_code == 200, r.text
    d = r.json()
    assert d["score"] == pytest.approx(s["score"], abs=1e-5)  # the score that ranked it leads
    cli = run_json("explain", str(photos / "chelsea.png"), str(photos / "chelsea_crop_flipped.jpg"),
                   "--index", str(index), "--verify", "--out", str(base / "cli-explain"))
    missing = set(cli) - set(d)
    assert not missing, missing
    assert d["score"] == pytest.approx(cli["score"], abs=1e-5)
    assert d["explained"] == cli["explained"] and d["cis_sum"] == pytest.approx(cli["cis_sum"], abs=1e-5)
    assert d["verdict"]["headline"] == cli["verdict"]["headline"] and d["inliers"] == cli["inliers"]
    assert len(d["inlier_points"]["query"]) == len(d["inlier_points"]["result"]) > 0
    assert d["correspondences"] and all(0 <= c_["share"] <= 1 for c_ in d["correspondences"])
    for url in (*d["layers"].values(), *d["downloads"].values()):
        f = client.get(url)
        assert f.status_code == 200 and len(f.content) > 100, url
    rep = client.get(d["downloads"]["report"])
    assert "default-src 'none'" in rep.headers["content-security-policy"] and "t-op" in rep.text
    dl = client.get(f"/api/explain?q={cat}&r={crop}&verify=1&download=1")
    assert dl.status_code == 200 and "attachment" in dl.headers["content-disposition"]
    # the method switch: a baseline explains the same pair
    g = client.get(f"/api/explain?q={cat}&r={crop}&method=gradcam").json()
    assert g["method"] == "gradcam" and g["score"] == pytest.approx(d["score"], abs=1e-5)


def test_thumbnails_are_cached_on_disk_with_caching_headers(served):
    c, client, photos, index, base = served
    i = _id_of(client, "coffee.png")
    r = client.get(f"/thumb/{i}?size=128")
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    assert "max-age" in r.headers["cache-control"] and r.headers.get("etag")
    from PIL import Image

    assert max(Image.open(io.BytesIO(r.content)).size) == 128
    cached = list((base / "cache" / "thumbs").glob("*_128.jpg"))
    assert len(cached) == 1
    again = client.get(f"/thumb/{i}?size=128", headers={"if-none-match": r.headers["etag"]})
    assert again.status_code == 304


@pytest.mark.parametrize("url", [
    "/photo/..%2F..%2F..%2Fetc%2Fpasswd", "/photo/%2e%2e%2f%2e%2e%2fetc%2fpasswd", "/photo/%252e%252e%252fetc",
    "/photo//etc/passwd", "/photo/%2Fetc%2Fpasswd", "/photo/-1", "/photo/999999", "/photo/1.0",
    "/thumb/..%2F..%2Fetc%2Fpasswd", "/thumb/0x1",
    "/static/../service.py", "/static/%2e%2e/service.py", "/static/..%2Fservice.py", "/static/%2e%2e%2f__init__.py",
    "/upload/..%2F..%2Fetc/passwd", "/upload/" + "0" * 64 + "/view.jpg", "/upload/x/..%2F..%2Fetc%2Fpasswd",
    "/explain/" + "0" * 24 + "/report.html", "/explain/..%2F..%2F/report.html", "/explain/x/..%2F..%2Fpasswd",
    "/api/explain?q=/etc/passwd&r=1", "/api/search?q=../../etc/passwd", "/api/search?q=%2Fetc%2Fpasswd",
])
def test_no_file_outside_the_index(served, url):
    c, client, *_ = served
    r = client.get(url)
    assert r.status_code in (400, 404), (url, r.status_code)
    assert "root:" not in r.text and "import" not in r.text
    if url.startswith("/api/") or url.startswith("/photo/"):
        assert r.json()["error"]


def test_a_file_swapped_for_a_link_out_is_not_served(served, tmp_path):
    c, client, photos, *_ = served
    i = _id_of(client, "rocket.jpg")
    assert client.get(f"/photo/{i}").status_code == 200
    target = photos / "rocket.jpg"
    keep = tmp_path / "rocket.jpg"
    shutil.move(target, keep)
    outside = tmp_path / "secret.jpg"
    shutil.copy(keep, outside)
    try:
        os.symlink(outside, target)
        r = client.get(f"/photo/{i}")
        assert r.status_code == 404 and "no longer the file that was indexed" in r.json()["error"]
        assert client.get(f"/api/explain?q={i}&r={i}").status_code == 404
    finally:
        target.unlink()
        shutil.move(keep, target)
    assert client.get(f"/photo/{i}").status_code == 200


def test_bad_uploads_are_clear_4xx(served):
    c, client, *_ = served
    for body, ctype in ((b"hello, not a photo", "text/plain"), (b"\x89PNG\r\n\x1a\n" + os.urandom(500), "image/png"),
                        (b"<svg xmlns='http://www.w3.org/2000/svg'/>", "image/svg+xml")):
        r = client.post("/api/upload", files={"image": ("x.png", body, ctype)})
        assert r.status_code == 415, (body[:10], r.status_code, r.text)
        msg = r.json()["error"]
        assert "\n" not in msg and "Traceback" not in msg and "x.png" in msg
    assert client.post("/api/upload", files={"image": ("e.jpg", b"", "image/jpeg")}).status_code == 400
    assert client.post("/api/upload", files={"note": (None, "no file")}).status_code == 400
    old = c.max_upload_bytes
    c.max_upload_bytes = 50_000
    try:
        big = (SAMPLES / "chelsea.png").read_bytes()
        assert len(big) > 50_000
        r = client.post("/api/upload", files={"image": ("big.png", big, "image/png")})
        assert r.status_code == 413 and "limit" in r.json()["error"]
        r = client.post("/api/search", content=big, headers={"content-type": "image/png"})
        assert r.status_code == 413
    finally:
        c.max_upload_bytes = old


def test_bad_parameters_are_clear_4xx(served):
    c, client, *_ = served
    i = _id_of(client, "coffee.png")
    for url, status, word in ((f"/api/search?q={i}&k=0", 400, "k"), (f"/api/search?q={i}&k=abc", 400, "k"),
                              (f"/api/search?q={i}&qe=-1", 400, "qe"), ("/api/search", 400, "q"),
                              ("/api/search?q=424242", 404, "424242"), ("/api/search?q=upload:abc", 404, "upload"),
                              (f"/api/explain?q={i}&r={i}&method=magic", 400, "method"),
                              (f"/api/explain?q={i}", 400, "r"), ("/api/nothing", 404, "not found")):
        r = client.get(url)
        assert r.status_code == status, (url, r.status_code, r.text)
        assert word in r.json()["error"]


def test_names_are_escaped_in_the_pages(served):
    c, client, *_ = served
    for page in ("/", "/pair?q=<script>alert(1)</script>&r=1"):
        r = client.get(page)
        assert r.status_code == 200 and "<script>alert" not in r.text
        assert "script-src 'self'" in r.headers["content-security-policy"]
    js = client.get("/static/search.js").text + client.get("/static/pair.js").text
    assert "innerHTML" not in js and "http://" not in js.replace("http://www.w3.org/2000/svg", "")
    for html in ("/", "/pair"):
        t = client.get(html).text
        assert "http://" not in t and "https://" not in t  # nothing loaded from elsewhere


def test_answers_from_the_last_committed_state_while_indexing(served, tmp_path):
    """Searches keep answering (200, every hit a row of the index) while `retrieve index` adds photos to the
    same index in another process; once the run has finished, the next search sees the new photos."""
    c, client, photos, index, _ = served
    cat = _id_of(client, "chelsea.png")
    more = photos / "more"
    more.mkdir()
    for name in ("coins.png", "horse.png", "astronaut.png"):
        shutil.copy(SAMPLES / name, more / name)
    before = client.get("/api/health").json()["images"]
    import subprocess

    from clitools import entry_point

    proc = subprocess.Popen(entry_point() + ["index", str(photos), "--index", str(index), "--batch-size", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    answers, errors = [], []

    def hammer():
        while proc.poll() is None and len(answers) < 400:
            r = client.get(f"/api/search?q={cat}&k=10")
            (answers if r.status_code == 200 else errors).append(r)
            time.sleep(0.05)

    threads = [threading.Thread(target=hammer) for _ in range(2)]
    for t in threads:
        t.start()
    out, err = proc.communicate(timeout=240)
    for t in threads:
        t.join()
    assert proc.returncode == 0, err
    assert not errors, [(r.status_code, r.text) for r in errors[:3]]
    assert answers
    for r in answers:
        res = r.json()["results"]
        assert len(res) in (before - 1, before - 1 + 3) or len(res) >= before - 1
        assert [h["rank"] for h in res] == list(range(1, len(res) + 1))
    after = client.get(f"/api/search?q={cat}&k=20").json()
    assert len(after["results"]) == before + 3 - 1  # the new state, loaded once the run finished
    assert client.get("/api/health").json()["images"] == before + 3
    for name in ("coins.png", "horse.png", "astronaut.png"):
        (more / name).unlink()
    more.rmdir()
    run("index", str(photos), "--index", str(index))  # back to the five photos for any test after this one


def test_serve_without_the_extra_names_it(monkeypatch):
    import sys

    from click.testing import CliRunner

    from cli import main

    monkeypatch.setitem(sys.modules, "uvicorn", None)
    r = CliRunner().invoke(main, ["serve", "--port", "0"])
    assert r.exit_code != 0
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and "pip install -e '.[serve]'" in lines[0] and "uvicorn" in lines[0]


def test_loopback_and_busy_port():
    import socket

    from retrieval.errors import RetrieveError
    from web.server import bind, is_loopback

    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1") and is_loopback("127.0.0.2")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.4") and not is_loopback("example.org")
    s = bind("127.0.0.1", 0)
    try:
        with pytest.raises(RetrieveError, match="--port"):
            bind("127.0.0.1", s.getsockname()[1]).close()
    finally:
        s.close()


def test_serve_warns_off_loopback_and_fails_in_one_line(served):
    """A non-loopback --host is warned about; an address it cannot listen on is one error line (192.0.2.1 is a
    documentation address, on no machine: nothing is bound). In-process: tests/test_browser.py starts the
    installed command."""
    r = run("serve", "--index", str(served[3]), "--host", "192.0.2.1", "--port", "8000", ok=False)
    assert r.exit_code != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("Warning: listening on 192.0.2.1")
    assert lines[1].startswith("Error: cannot listen on 192.0.2.1:8000")


def test_a_server_stopped_by_sigterm_removes_its_uploads_folder(served, tmp_path):
    """`retrieve serve` ended as a service manager ends it (SIGTERM) exits 0 and leaves no temporary folder behind
    (uvicorn raises the signal again after its graceful stop; the command's cleanup must still run)."""
    from clitools import start_server, stop

    _, _, _, index, _ = served
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    proc, url, _ = start_server(index, env={"TMPDIR": str(tmp)})
    try:
        uploads = [p for p in tmp.iterdir() if p.name.startswith("retrieve-serve-uploads-")]
        assert len(uploads) == 1 and uploads[0].is_dir()
    finally:
        stop(proc, wait=60)  # (once over 10 s on a loaded 2-core CI machine; 0.6 s here)
    assert proc.returncode == 0
    assert not uploads[0].exists()


def test_a_killed_server_s_uploads_folder_goes_when_the_next_one_starts(served, tmp_path):
    """SIGKILL (or the OOM killer) skips every clean-up: the folder stays until the next `retrieve serve` with the
    same temporary directory starts, which removes it (its owner's lock died with it, retrieval/scratch.py) and
    keeps its own."""
    import signal

    from clitools import start_server, stop

    _, _, _, index, _ = served
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    proc, _, _ = start_server(index, env={"TMPDIR": str(tmp)})
    proc.send_signal(signal.SIGKILL)
    proc.wait(60)
    stop(proc)
    [left] = [p for p in tmp.iterdir() if p.name.startswith("retrieve-serve-uploads-")]
    proc, _, _ = start_server(index, env={"TMPDIR": str(tmp)})
    try:
        now = [p for p in tmp.iterdir() if p.name.startswith("retrieve-serve-uploads-")]
        assert not left.exists() and len(now) == 1 and now[0].is_dir()
    finally:
        stop(proc, wait=60)
    assert not now[0].exists()
