"""retrieve serve against a hostile web page and other local users, over a real socket to the installed command:
a foreign Host (DNS rebinding), a request from another origin or site (CSRF, cross-site embeds) and a missing or
wrong token are refused with one line; the token in the printed URL sets an HttpOnly SameSite=Strict cookie
and leaves the URL; --no-token only on loopback. The model: docs/security.md."""
from __future__ import annotations

import http.client
import json
import shutil
from pathlib import Path

import pytest

pytest.importorskip("starlette", reason="the serve extra is not installed (pip install -e '.[serve]')")

from clitools import run, run_process, start_server, stop  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "data" / "samples"
TOKEN = "a-fixed-token-for-this-test_0123456789"


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    from indexer import index_paths

    base = tmp_path_factory.mktemp("websec")
    photos = base / "photos"
    photos.mkdir()
    for name in ("chelsea.png", "coffee.png", "rocket.jpg"):
        shutil.copy(SAMPLES / name, photos / name)
    index_paths([str(photos)], base / "index")
    return base / "index"


@pytest.fixture(scope="module")
def server(index):
    """The server with its token fixed by RETRIEVE_TOKEN: (port, token)."""
    proc, url, token = start_server(index, env={"RETRIEVE_TOKEN": TOKEN})
    try:
        assert token == TOKEN and url.startswith("http://127.0.0.1:")
        yield int(url.rsplit(":", 1)[1].strip("/")), token
    finally:
        stop(proc)


def ask(port: int, path: str, method: str = "GET", body: bytes | None = None, **headers: str):
    """One raw request with exactly these headers (``Host`` included; ``_`` in a name is ``-``): (status,
    headers, body)."""
    con = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        con.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        hs = {"Host": f"127.0.0.1:{port}", **{k.replace("_", "-"): v for k, v in headers.items()}}
        for k, v in hs.items():
            if v is not None:
                con.putheader(k, v)
        if body is not None:
            con.putheader("Content-Length", str(len(body)))
        con.endheaders(body)
        r = con.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        con.close()


def refused(status: int, body: bytes, *words: str) -> bool:
    text = body.decode()
    return status == 403 and "\n" not in text.strip() and all(w in json.loads(text)["error"] for w in words)


def auth(token: str) -> dict:
    return {"Authorization": f"token {token}"}


def test_a_foreign_host_is_refused_even_with_the_token(server):
    port, token = server
    for host in (f"evil.example:{port}", "evil.example", f"localhost.evil.example:{port}", ""):
        status, _, body = ask(port, "/api/images", Host=host, **auth(token))
        assert refused(status, body, "Host"), (host, status, body)
        assert b"chelsea" not in body
    status, _, body = ask(port, "/api/images", Host=f"evil.example:{port}", **auth(token))
    assert "--allow-host evil.example" in json.loads(body)["error"]  # the way in, if the name is yours
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"LOCALHOST:{port}", "127.0.0.1:9000"):  # 9000: a tunnel
        status, _, body = ask(port, "/api/images", Host=host, **auth(token))
        assert status == 200 and b"chelsea.png" in body, (host, status)


def test_a_cross_origin_or_cross_site_request_is_refused(server):
    port, token = server
    photo = (SAMPLES / "coffee.png").read_bytes()
    for origin in ("http://evil.example", f"http://evil.example:{port}", "null", f"http://localhost:{port + 1}"):
        status, _, body = ask(port, "/api/search?k=2", "POST", photo, Origin=origin, Content_Type="image/png",
                              **auth(token))
        assert refused(status, body, "cross-origin"), (origin, status, body)
    status, _, body = ask(port, "/api/upload", "POST", photo, Origin="http://evil.example",
                          Content_Type="image/png", **auth(token))
    assert refused(status, body, "cross-origin")
    # the server's own page (Origin = its own address) and a script (no Origin) are served
    for origin in (f"http://127.0.0.1:{port}", None):
        status, _, body = ask(port, "/api/search?k=2", "POST", photo, Origin=origin, Content_Type="image/png",
                              **auth(token))
        assert status == 200 and json.loads(body)["results"][0]["name"] == "coffee.png", (origin, status, body)
    # fetch metadata: another site's <img>, fetch or form is refused; following a link to the page is not
    for site, mode, dest in (("cross-site", "no-cors", "image"), ("same-site", "cors", "empty"),
                             ("cross-site", "navigate", "iframe")):
        status, _, body = ask(port, "/photo/1", Sec_Fetch_Site=site, Sec_Fetch_Mode=mode, Sec_Fetch_Dest=dest,
                              **auth(token))
        assert refused(status, body, "another site"), (site, mode, dest, status)
    status, _, _ = ask(port, "/", Sec_Fetch_Site="cross-site", Sec_Fetch_Mode="navigate",
                       Sec_Fetch_Dest="document", **auth(token))
    assert status == 200


def test_a_missing_or_wrong_token_is_refused_and_the_right_one_accepted(server):
    port, token = server
    cookie = f"retrieve_token_{port}"
    for path in ("/", "/api/health", "/api/images", "/photo/1", "/thumb/1", "/static/search.js"):
        status, headers, body = ask(port, path)
        assert refused(status, body, "no token", "open the URL that retrieve serve printed"), (path, status)
        assert b"chelsea" not in body and "set-cookie" not in headers
    for bad in ({"Authorization": "token " + token[:-1] + "x"}, {"Authorization": f"token {token}x"},
                {"Cookie": f"{cookie}=nope"}, {"Cookie": f"retrieve_token_{port + 1}={token}"},
                {"Authorization": token}):
        status, _, body = ask(port, "/api/images", **bad)
        assert refused(status, body, "token"), (bad, status, body)
    status, _, body = ask(port, "/api/images", Cookie=f"{cookie}=nope")
    assert "wrong token" in json.loads(body)["error"]
    for good in (auth(token), {"Authorization": f"Bearer {token}"}, {"Cookie": f"other=1; {cookie}={token}"}):
        status, headers, body = ask(port, "/api/images", **good)
        assert status == 200 and b"chelsea.png" in body, (good, status)
        assert "'unsafe-inline'" not in headers["content-security-policy"]
    status, headers, body = ask(port, "/", **auth(token))
    assert status == 200 and b"/static/search.js" in body
    csp = headers["content-security-policy"]
    assert "script-src 'self';" in csp and "style-src 'self';" in csp and "unsafe-inline" not in csp


def test_the_token_in_the_url_sets_the_cookie_and_leaves_the_url(server):
    port, token = server
    status, headers, body = ask(port, f"/pair?q=1&token={token}&r=2")
    assert status == 303 and headers["location"] == "/pair?q=1&r=2"
    assert headers["cache-control"] == "no-store"
    cookie = headers["set-cookie"]
    assert cookie.startswith(f"retrieve_token_{port}={token};")
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/" in cookie
    status, headers, _ = ask(port, f"/?token={token}")
    assert status == 303 and headers["location"] == "/"
    for path in (f"//evil.example/?token={token}", f"/%5Cevil.example?token={token}"):  # never to another host
        status, headers, _ = ask(port, path)
        assert status == 303 and headers["location"].startswith("/") and not headers["location"].startswith("//")
    status, headers, body = ask(port, "/?token=guess")
    assert refused(status, body, "wrong token") and "set-cookie" not in headers


def test_no_token_only_on_loopback_and_a_bad_fixed_token(index, monkeypatch):
    r = run_process("serve", "--index", index, "--host", "0.0.0.0", "--port", "0", "--no-token", timeout=120)
    assert r.returncode != 0 and r.stdout == ""
    assert r.stderr.strip().splitlines() == [(
        "Error: --no-token is allowed only on a loopback address: 0.0.0.0 can be reached from other machines, "
        "so the server needs its token there")]
    for value, words in (("short", "16 to 256 characters"), ("a token with spaces in it", "16 to 256")):
        monkeypatch.setenv("RETRIEVE_TOKEN", value)
        r = run("serve", "--index", index, "--port", "0", ok=False)
        assert r.exit_code != 0 and r.stderr.strip().startswith("Error: RETRIEVE_TOKEN") and words in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
    monkeypatch.setenv("RETRIEVE_TOKEN", TOKEN)
    r = run("serve", "--index", index, "--port", "0", "--no-token", ok=False)
    assert r.exit_code != 0 and "contradict" in r.stderr


def test_no_token_on_loopback_still_checks_host_and_origin(index):
    proc, url, token = start_server(index, "--no-token")
    try:
        assert token is None and "token" not in url
        port = int(url.rsplit(":", 1)[1].strip("/"))
        status, _, body = ask(port, "/api/health")
        assert status == 200 and json.loads(body)["images"] == 3
        assert refused(*ask(port, "/api/images", Host=f"evil.example:{port}")[::2], "Host")
        assert refused(*ask(port, "/api/upload", "POST", b"x", Origin="http://evil.example")[::2], "cross-origin")
    finally:
        stop(proc)


def test_listening_on_every_address_needs_the_token_and_knows_this_machine():
    import socket

    from web.security import Guard

    g = Guard.for_address("0.0.0.0", allow_hosts=("Photos.Example.",))
    assert g.token and len(g.token) >= 40  # secrets.token_urlsafe(32)
    assert Guard.for_address("0.0.0.0").token != g.token  # one per run
    assert {"localhost", socket.gethostname().lower(), "photos.example"} <= g.names
    assert "::" not in g.names and "0.0.0.0" not in g.names  # addresses are accepted as addresses
    assert Guard.for_address("127.0.0.1", token=False).token is None
    assert Guard.for_address("127.0.0.1").names == {"localhost"}  # on loopback: loopback names only
