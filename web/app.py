"""The Starlette app of ``retrieve serve``: four pages (search, pair, duplicates, people), their static assets and a
JSON API.

Routes (every API answer is JSON; an error is ``{"error": "<one line>"}`` with a 4xx status, or 503 when busy,
never a trace):

- ``GET /`` search page · ``GET /pair?q=…&r=…`` pair page · ``/static/…`` the pages' CSS and JS
- ``GET /api/health`` · ``GET /api/info`` (``retrieve info --json``) · ``GET /api/images?offset=&limit=``
- ``POST /api/upload`` (a photo: multipart field ``image`` or the raw body) → ``{"token": …}``
- ``GET|POST /api/search`` (``q`` = an indexed photo's id or ``upload:<token>``, or a photo in the POST body;
  ``k``, ``offset``, ``qe``, ``verify``) → ``retrieve search --json``'s fields, each hit with its verdict
- ``GET /api/explain?q=…&r=<id>&method=sfam|sfam-plain|gradcam|occlusion&verify=0|1`` → ``retrieve explain --json``'s fields
- ``GET /duplicates`` page · ``GET /api/duplicates?similar=0|1&offset=&limit=&wait=`` → ``retrieve duplicates
  --json``'s fields with one page of groups (202 with the progress while they are being found, after ``wait`` s)
- ``GET /people`` page · ``GET /api/people`` (``retrieve people --json``) · ``GET /api/people/<id>`` (their photos)
  · ``POST /api/people/<id>/name`` (JSON ``{"name": …}``; 409 while another retrieve writes the index)
- ``GET /thumb/<id>?size=&face=0|1`` · ``GET /photo/<id>`` · ``GET /upload/<token>/view.jpg`` · ``GET /explain/<key>/<file>``

Bounded under load (web/service.py has the limits): no handler waits on the event loop; uploads are counted as they
arrive; work that waits its turn (decoding, explanations) holds a few worker threads at most.
"""
from __future__ import annotations

import asyncio
import functools
import json
import logging
from pathlib import Path

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from retrieval.errors import ImageError, RetrieveError
from retrieval.names import shown

from .curation import DUPLICATES_WAIT_S, MAX_NAME_BODY, Curation, Locked
from .security import REPORT_CSP, SECURITY_HEADERS, Guard, GuardMiddleware
from .service import FORM_OVERHEAD, RENDER_WAIT_S, BadRequest, Busy, NotAnImage, NotFound, Service, TooLarge

# Threads that work which waits its turn in the service (decoding slots, one explanation at a time) may hold at
# once; further requests wait on the event loop without a thread, so they never take the threads searches need.
DECODING_THREADS = 8
EXPLAINING_THREADS = 4

STATIC = Path(__file__).with_name("static")
CACHE_FOREVER = "public, max-age=31536000, immutable"  # URLs that change with the content (?v=<hash>)
log = logging.getLogger("retrieve.serve")


class _JSONResponse(JSONResponse):
    """JSON in ASCII: a file name that is not UTF-8 travels as ``\\udcXX`` escapes, which ``JSON.parse`` reads
    (retrieval/names.py), where Starlette's UTF-8 rendering would fail on it."""

    def render(self, content) -> bytes:
        return json.dumps(content, allow_nan=False, separators=(",", ":")).encode("ascii")


def _seconds(value, name: str, most: float) -> float:
    """A wait in seconds from a query parameter: 0 to ``most`` (``most`` when not given)."""
    if value is None or value == "":
        return most
    try:
        v = float(value)
    except ValueError:
        raise BadRequest(f"{name}: not a number of seconds ({value[:40]!r})") from None
    if not 0 <= v <= most:
        raise BadRequest(f"{name}: {v:g} is outside 0..{most:g} seconds")
    return v


def _error(status: int, message: str) -> JSONResponse:
    return _JSONResponse({"error": message}, status_code=status, headers=SECURITY_HEADERS)


def _json(d) -> JSONResponse:
    return _JSONResponse(d, headers={**SECURITY_HEADERS, "Cache-Control": "no-store"})


def create_app(collection: Service, guard: Guard | None = None) -> Starlette:
    """The app over one loaded :class:`Service` (the model and the index are loaded once, by it), behind
    ``guard`` (web/security.py: Host, origin and token checks). ``retrieve serve`` always passes one; None
    serves unguarded, for a benchmark calling the handlers in-process."""
    c = collection
    curation = Curation(c)  # the Duplicates and People pages' work (stopped by the service's close)
    limiters: dict = {}

    async def _queued(name: str, fn, *args):
        """``fn(*args)`` in a worker thread, at most ``DECODING_THREADS`` / ``EXPLAINING_THREADS`` of them for its
        kind (``name``) at once; the rest wait here, without a thread."""
        import anyio

        if name not in limiters:
            limiters[name] = anyio.CapacityLimiter(DECODING_THREADS if name == "decoding" else EXPLAINING_THREADS)
        return await anyio.to_thread.run_sync(functools.partial(fn, *args), limiter=limiters[name])

    async def page(name: str) -> Response:
        return FileResponse(STATIC / name, media_type="text/html",
                            headers={**SECURITY_HEADERS, "Cache-Control": "no-cache"})

    async def search_page(request: Request):
        return await page("search.html")

    async def duplicates_page(request: Request):
        return await page("duplicates.html")

    async def people_page(request: Request):
        return await page("people.html")

    async def pair_page(request: Request):
        return await page("pair.html")

    async def health(request: Request):
        return _json(await run_in_threadpool(c.health))

    async def info(request: Request):
        return _json(await run_in_threadpool(c.info))

    async def images(request: Request):
        p = request.query_params
        return _json(await run_in_threadpool(c.images, p.get("offset"), p.get("limit")))

    async def _keep_upload(request: Request) -> dict:
        """The photo in a request, kept (:meth:`Service.add_upload`); its bytes count against the service's budget
        of upload bytes in memory from the first one received until it is kept."""
        counted = [0]
        try:
            data, name = await _read_upload(request, counted)
            return await _queued("decoding", c.add_upload, data, name)
        finally:
            c.release_upload(counted[0])

    async def _read_upload(request: Request, counted: list) -> tuple[bytes, str]:
        """The photo in a request: multipart field ``image`` (or the first file), or the raw body. The body is
        counted as it arrives, chunked or not (in ``counted[0]``): past the cap (plus a form's overhead) it is a 413
        at once, and past the bytes all uploads together may hold a 503."""
        cap = c.max_upload_bytes
        limit = cap + FORM_OVERHEAD
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > limit:
            raise TooLarge(f"upload too large: {int(length):,} bytes (the limit is {cap:,})")

        async def receive():
            message = await request.receive()
            n = len(message.get("body", b"")) if message["type"] == "http.request" else 0
            if counted[0] + n > limit:
                raise TooLarge(f"upload too large: more than {cap:,} bytes (the limit)")
            if n:
                c.reserve_upload(n)
                counted[0] += n
            return message

        body = Request(request.scope, receive)
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            try:
                form = await body.form(max_files=1, max_fields=20, max_part_size=FORM_OVERHEAD)
            except (TooLarge, Busy):
                raise
            except Exception as e:  # the multipart parser's own errors (sizes, malformed bodies)
                msg = str(getattr(e, "detail", "") or e).splitlines()[0] if str(e) else "malformed form"
                if "size" in msg.lower() or "large" in msg.lower():
                    raise TooLarge(f"upload too large (the limit is {cap:,} bytes)") from None
                raise BadRequest(f"cannot read the form: {msg}") from None
            try:
                f = form.get("image")
                if f is None or isinstance(f, str):
                    f = next((v for _, v in form.multi_items() if not isinstance(v, str)), None)
                if f is None:
                    raise BadRequest("no photo in the form: send it as the field 'image'")
                return await f.read(cap + 1), f.filename or "upload"
            finally:
                await form.close()
        chunks = []
        async for chunk in body.stream():
            chunks.append(chunk)
        return b"".join(chunks), request.query_params.get("name") or "upload"

    async def upload(request: Request):
        return _json(await _keep_upload(request))

    async def search(request: Request):
        p = dict(request.query_params)
        if request.method == "POST":
            ctype = request.headers.get("content-type", "")
            if ctype.startswith("multipart/form-data") or not p.get("q"):
                p["q"] = "upload:" + (await _keep_upload(request))["token"]
        if not p.get("q"):
            raise BadRequest("q: give an indexed photo's id or upload:<token> (or POST a photo)")
        return _json(await run_in_threadpool(c.search, p["q"], p.get("k"), p.get("offset"), p.get("qe"),
                                             p.get("verify")))

    async def explain(request: Request):
        p = request.query_params
        if not p.get("q") or not p.get("r"):
            raise BadRequest("give q (an indexed photo's id or upload:<token>) and r (an indexed photo's id)")
        doc = await _queued("explaining", c.explain, p["q"], p["r"], p.get("method") or "sfam", p.get("verify", "0"))
        if p.get("download"):
            return FileResponse(await _explained_file(doc["key"], "explain.json"), media_type="application/json",
                                filename="explain.json", headers=SECURITY_HEADERS)
        return _json(doc)

    async def duplicates(request: Request):
        """The groups (``retrieve duplicates --json``), one page of them; 202 with the progress while they are
        being found (the page asks again)."""
        p = request.query_params
        similar = p.get("similar", "0").lower() in ("1", "true", "yes", "on")
        wait = _seconds(p.get("wait"), "wait", DUPLICATES_WAIT_S)
        job = await run_in_threadpool(curation.duplicates_job, similar)
        if not job.future.done():
            try:  # shielded: a client that leaves does not cancel the computation
                await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(job.future)), wait)
            except asyncio.TimeoutError:
                return _JSONResponse(job.status(), status_code=202,
                                     headers={**SECURITY_HEADERS, "Cache-Control": "no-store"})
            except Exception:
                pass  # its error: duplicates_page raises it
        return _json(await run_in_threadpool(curation.duplicates_page, job, p.get("offset"), p.get("limit")))

    async def people(request: Request):
        return _json(await run_in_threadpool(curation.people))

    async def person(request: Request):
        return _json(await run_in_threadpool(curation.person, request.path_params["id"]))

    async def person_name(request: Request):
        if not request.headers.get("content-type", "").startswith("application/json"):
            raise BadRequest('send JSON {"name": "…"} (Content-Type: application/json)')
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_NAME_BODY:
                raise TooLarge(f"too large: a name is at most {MAX_NAME_BODY:,} bytes of JSON")
        return _json(await run_in_threadpool(curation.rename, request.path_params["id"], body))

    async def thumb(request: Request):
        path = await _queued("decoding", c.thumbnail, request.path_params["id"], request.query_params.get("size"),
                             request.query_params.get("face"))
        etag = f'"{path.stem}"'  # <content hash>_<size>: the same bytes for as long as the photo is the same
        headers = {**SECURITY_HEADERS, "Cache-Control": CACHE_FOREVER, "ETag": etag}
        if etag in request.headers.get("if-none-match", ""):
            return Response(status_code=304, headers=headers)
        return FileResponse(path, media_type="image/jpeg", headers=headers)

    async def photo(request: Request):
        path = await run_in_threadpool(c.photo_path, request.path_params["id"])
        return FileResponse(path, headers={**SECURITY_HEADERS, "Cache-Control": "private, max-age=3600"},
                            content_disposition_type="inline", filename=shown(path.name))

    async def _explained_file(key: str, name: str) -> Path:
        """An explanation's file, its background drawing awaited without holding the event loop (nor a thread)."""
        job = c.drawing(key, name)
        if job is not None and not job.done():
            try:  # shielded: a client that leaves does not cancel the drawing
                await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(job)), RENDER_WAIT_S)
            except asyncio.TimeoutError:
                raise Busy(f"{name} is still being drawn after {RENDER_WAIT_S} s; try again later") from None
            except Exception:
                pass  # the drawing's error: explained_file says it
        return c.explained_file(key, name)

    async def upload_file(request: Request):
        kind = request.path_params["file"].removesuffix(".jpg")
        path = c.upload_file(request.path_params["token"], kind)
        return FileResponse(path, media_type="image/jpeg", headers={**SECURITY_HEADERS, "Cache-Control": CACHE_FOREVER})

    async def explained(request: Request):
        path = await _explained_file(request.path_params["key"], request.path_params["file"])
        headers = {**SECURITY_HEADERS, "Cache-Control": "private, max-age=3600"}
        if path.suffix == ".html":  # the report is self-contained: nothing but its inline style and script
            headers["Content-Security-Policy"] = REPORT_CSP  # sandboxed: an opaque origin, no cookie, no API
        return FileResponse(path, headers=headers)

    async def on_retrieve_error(request: Request, e: Exception):
        if isinstance(e, NotFound):
            return _error(404, str(e))
        if isinstance(e, TooLarge):
            return _error(413, str(e))
        if isinstance(e, Busy):
            return _error(503, str(e))
        if isinstance(e, Locked):
            return _error(409, str(e))
        if isinstance(e, NotAnImage):
            return _error(415, str(e))
        if isinstance(e, (BadRequest, ImageError)):
            return _error(400 if not isinstance(e, ImageError) else 422, str(e))
        return _error(400, str(e))

    async def on_http(request: Request, e: HTTPException):
        text = {404: "not found", 405: "method not allowed"}.get(e.status_code, str(e.detail))
        return _error(e.status_code, text)

    async def on_other(request: Request, e: Exception):
        log.exception("request failed: %s", request.url.path)
        return _error(500, f"internal error ({type(e).__name__}); the server log has the details")

    routes = [
        Route("/", search_page), Route("/pair", pair_page),
        Route("/duplicates", duplicates_page), Route("/people", people_page),
        Route("/api/duplicates", duplicates), Route("/api/people", people), Route("/api/people/{id}", person),
        Route("/api/people/{id}/name", person_name, methods=["POST"]),
        Route("/api/health", health), Route("/api/info", info), Route("/api/images", images),
        Route("/api/upload", upload, methods=["POST"]),
        Route("/api/search", search, methods=["GET", "POST"]),
        Route("/api/explain", explain),
        Route("/thumb/{id}", thumb), Route("/photo/{id}", photo),
        Route("/upload/{token}/{file}", upload_file),
        Route("/explain/{key}/{file}", explained),
        Mount("/static", app=StaticFiles(directory=STATIC, follow_symlink=False), name="static"),
    ]
    app = Starlette(routes=routes, exception_handlers={RetrieveError: on_retrieve_error, HTTPException: on_http,
                                                       Exception: on_other},
                    middleware=[Middleware(GuardMiddleware, guard=guard)] if guard else [])
    app.state.collection = c
    return app
