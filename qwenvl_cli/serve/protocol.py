"""The HTTP/1.1 protocol of the server: uvicorn's h11 protocol, except that a request it
cannot parse (a malformed ``Content-Length``, a broken request line) is answered with the
OpenAI error shape in JSON, as every other 400, instead of uvicorn's plain text."""

from __future__ import annotations

import json
from typing import Any


def openai_h11_protocol() -> Any:
    """The protocol class to give ``uvicorn.Config(http=...)``."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    from qwenvl_cli.serve.api import BadRequest, error_body

    class MalformedRequest(BadRequest):
        code = "malformed_request"

    class OpenAIErrorsH11Protocol(H11Protocol):
        def send_400_response(self, msg: str) -> None:
            err = MalformedRequest(f"the HTTP request is malformed (bad request line, header or Content-Length): {msg}",
                                   "send a well-formed HTTP/1.1 request (check the Content-Length header)")
            body = json.dumps(error_body(err)).encode()
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                       (b"connection", b"close")]
            self.transport.write(self.conn.send(h11.Response(status_code=400, headers=headers,
                                                             reason=b"Bad Request")))
            self.transport.write(self.conn.send(h11.Data(data=body)))
            self.transport.write(self.conn.send(h11.EndOfMessage()))
            self.transport.close()

    return OpenAIErrorsH11Protocol
