# SPDX-License-Identifier: Apache-2.0
"""The proxy's OpenAI-compatible edge: a request body checked before any
backend sees it, and errors in OpenAI's shape."""

from __future__ import annotations

import json

from fastapi import Request
from fastapi.responses import JSONResponse

from kvbridge.serve.proxy.backends import BackendPool

#: Upper bound on max_tokens when no backend reports max_model_len.
DEFAULT_MAX_TOKENS_LIMIT = 1 << 20


class ClientError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = (status, message, param,
                                                                       code, type_)

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.type, self.param, self.code)


def error_response(status: int, message: str, type_: str, param: str | None = None,
                   code: str | None = None) -> JSONResponse:
    """OpenAI's error body."""
    return JSONResponse({"error": {"message": message, "type": type_, "param": param,
                                   "code": code if code is not None else status}},
                        status_code=status)


async def parse_body(request: Request, kind: str, pool: BackendPool) -> dict:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ClientError(400, f"request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise ClientError(400, "request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ClientError(400, "missing required field 'model'", "model")
    known = pool.models()
    if known and model not in known:
        raise ClientError(404, f"The model `{model}` does not exist.", "model",
                          "model_not_found")
    if kind == "chat":
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise ClientError(400, "'messages' must be a non-empty list", "messages")
    else:
        prompt = body.get("prompt")
        if prompt is None or prompt == "" or prompt == []:
            raise ClientError(400, "missing required field 'prompt'", "prompt")
    limit = pool.max_model_len() or DEFAULT_MAX_TOKENS_LIMIT
    for key in ("max_tokens", "max_completion_tokens"):
        if key in body and body[key] is not None:
            v = body[key]
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ClientError(400, f"'{key}' must be a positive integer, got {v!r}", key)
            if v > limit:
                raise ClientError(400, f"'{key}' is {v}, more than the model's maximum "
                                       f"context length {limit}", key)
    return body
