"""Talking to a `retrieve serve` over a real socket: start the command and read the URL it prints (with its
``?token=…`` when it has one: clitools.start_server), and requests that carry that token (``Authorization``)."""
from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

from clitools import start_server


class Client:
    """Requests to a server at ``url`` (its root URL), carrying ``token`` when it has one."""

    url: str = ""
    token: str | None = None

    def headers(self) -> dict:
        if not self.token:
            return {}
        return {"Authorization": f"token {self.token}"}

    def request(self, path: str, data: bytes | None = None, headers: dict | None = None,
                timeout: float = 300) -> tuple[int, bytes]:
        """(status, body) of a GET (or a POST of ``data``) to ``path``; an HTTP error is returned, not raised."""
        req = urllib.request.Request(self.url + path.lstrip("/"), data=data, headers={**self.headers(),
                                                                                      **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def json(self, path: str, data: bytes | None = None, headers: dict | None = None) -> tuple[int, dict]:
        status, body = self.request(path, data, headers)
        return status, json.loads(body)

    def upload(self, path: str, photo: Path, field: str = "image") -> tuple[int, dict]:
        """POST ``photo`` as a multipart form (as the search page sends it)."""
        body, ctype = multipart(field, photo.name, photo.read_bytes())
        return self.json(path, body, {"Content-Type": ctype})



class Served(Client):
    """A `retrieve serve` process and its base URL; ``token``: the one in the printed URL, else None."""

    def __init__(self, index: Path, cwd: Path, *args: str, env: dict | None = None, timeout: float = 180):
        self.proc, self.url, self.token = start_server(index, *args, env=env, cwd=cwd, timeout=timeout)

    def stop(self) -> None:
        from clitools import stop

        stop(self.proc)


def multipart(field: str, filename: str, data: bytes) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{filename}\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode()
    return head + data + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"
