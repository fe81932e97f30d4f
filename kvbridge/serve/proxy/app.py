# SPDX-License-Identifier: Apache-2.0
"""``kvbridge proxy``: one OpenAI-compatible endpoint over prefill and decode pools.

Per request: pick a prefill instance (least outstanding requests), send it the
request with ``max_tokens=1`` and ``kv_transfer_params={"do_remote_decode":
true}`` (vLLM's proxy contract), then send the original request with the
prefill response's ``kv_transfer_params`` - unchanged - to a decode instance
and stream its answer back token by token. With ``--kv-mode stream`` both get
the request at once and decode reads the KV while prefill computes it
(``modes``).

Beyond a plain P/D router: when no prefill instance is usable the decode
instance answers alone (colocated fallback, logged and counted); a decode
instance dying mid-stream yields a well-formed SSE error event (never a
truncated stream that ends like a complete one); instances whose KV layouts
differ are never paired; each response carries per-request KV figures in
``X-KVBridge-*`` headers.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from kvbridge.errors import ErrorCode
from kvbridge.serve.proxy.backends import PICKERS, Backend, BackendPool
from kvbridge.serve.proxy.modes import (
    KV_MODES,
    PREFILL_KV_PARAMS,
    can_stream,
    push_coords,
    streamed_kv_params,
    vllm_request_id,
)
from kvbridge.serve.proxy.metrics import ProxyMetrics
from kvbridge.serve.proxy.openai_api import ClientError, error_response, parse_body

logger = logging.getLogger("kvbridge.serve.proxy")

#: Idle connections to backends are dropped after this long: below the 5 s
#: after which vLLM's API server (uvicorn, ``--timeout-keep-alive``) closes
#: them, so a request never goes out on a connection the server is closing
#: (httpx's default expiry is those same 5 s; the race fails the request).
KEEPALIVE_EXPIRY_S = 2.0


def create_app(prefill: list[str], decode: list[str], *, policy: str = "least-outstanding",
               health_interval_s: float = 2.0, startup_wait_s: float = 0.0,
               request_timeout_s: float = 600.0, kv_mode: str = "pull",
               request_log: str | None = None) -> FastAPI:
    """``kv_mode``: ``pull`` - decode gets the request once prefill answered
    and reads its KV; ``stream`` - both get it at once and decode reads the
    KV while prefill computes it (``kvbridge.vllm.stream``), or, with vLLM's
    NixlPushConnector, registers its blocks for prefill to write into once
    the instance's first answer named its coordinates; any other prefill
    instance is pulled from. ``request_log``: a file to append one JSON line
    per disaggregated request to (``RequestTimeline``)."""
    if kv_mode not in KV_MODES:
        raise ValueError(f"kv_mode must be one of {KV_MODES}, got {kv_mode!r}")
    metrics = ProxyMetrics()
    if request_log:
        metrics.open_request_log(request_log)
    #: background prefills of streamed requests (kept referenced until done)
    state: dict = {"prefills": set()}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        client = httpx.AsyncClient(timeout=httpx.Timeout(request_timeout_s, connect=5.0),
                                   limits=httpx.Limits(max_connections=1024,
                                                       max_keepalive_connections=256,
                                                       keepalive_expiry=KEEPALIVE_EXPIRY_S))
        pool = BackendPool(prefill, decode, client, picker=PICKERS[policy](),
                           health_interval_s=health_interval_s)
        pool.on_change = metrics.backend_changed
        state.update(client=client, pool=pool)
        try:
            await pool.start(wait_s=startup_wait_s)
            for b in pool.all:
                metrics.backend_changed(b)
            logger.info("kvbridge proxy: %d prefill, %d decode backends: %s", len(pool.prefill),
                        len(pool.decode), [b.as_dict() for b in pool.all])
            yield
        finally:
            await pool.stop()
            await client.aclose()
            metrics.close()

    app = FastAPI(title="kvbridge proxy", lifespan=lifespan)
    app.state.metrics = metrics
    app.state.proxy = state

    # ------------------------------------------------------------------ info
    @app.get("/health")
    async def health() -> Response:
        pool: BackendPool = state["pool"]
        ok = any(b.usable for b in pool.decode)
        return JSONResponse({"status": "ok" if ok else "unavailable",
                             "backends": [b.as_dict() for b in pool.all]},
                            status_code=200 if ok else 503)

    @app.get("/v1/models")
    async def models() -> Response:
        pool: BackendPool = state["pool"]
        for b in pool.decode + pool.prefill:
            if not b.healthy:
                continue
            try:
                r = await state["client"].get(b.url + "/v1/models", timeout=5.0)
                return Response(r.content, status_code=r.status_code,
                                media_type="application/json")
            except httpx.HTTPError:
                continue
        return error_response(503, "no backend is available", "service_unavailable")

    @app.get("/metrics")
    async def prom() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    # ------------------------------------------------------------------ inference
    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await handle(request, "/v1/completions", "completions")

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await handle(request, "/v1/chat/completions", "chat")

    async def handle(request: Request, path: str, kind: str) -> Response:
        t_arrival = time.perf_counter()
        pool: BackendPool = state["pool"]
        client: httpx.AsyncClient = state["client"]
        try:
            body = await parse_body(request, kind, pool)
        except ClientError as e:
            metrics.request_done(kind, e.status)
            metrics.failure("bad_request")
            return e.response()
        request_id = request.headers.get("x-request-id") or f"kvb-{uuid.uuid4().hex}"
        headers = {"X-Request-Id": request_id}
        if auth := request.headers.get("authorization"):
            headers["Authorization"] = auth
        figures: dict = {"X-Request-Id": request_id}
        stream = bool(body.get("stream"))
        timeline = metrics.timeline(request_id, t_arrival, stream)

        # -- prefill ------------------------------------------------------
        kv_params = None
        mode = "disaggregated"
        tried: set[str] = set()
        if kv_mode == "stream":
            prefill = pool.pick("prefill")
            if prefill is not None and (can_stream(prefill) or prefill.push_coords):
                kv_params = start_streamed_prefill(request, client, prefill, path, body,
                                                   headers, request_id, timeline)
                figures["X-KVBridge-Prefill-Backend"] = prefill.url
                mode = "streamed"
        while mode != "streamed":
            prefill = pool.pick("prefill")
            if prefill is None or prefill.url in tried:
                mode = "fallback"
                metrics.fallback()
                logger.warning("kvbridge proxy: no prefill instance usable; request %s goes to "
                               "a decode instance colocated", request_id)
                break
            tried.add(prefill.url)
            try:
                kv_params, prefill_s = await run_prefill(request, client, prefill, path, body,
                                                         headers, timeline=timeline)
                if kv_mode == "stream" and (kv_params or {}).get("transfer_mode") == "push":
                    # vLLM's NixlPushConnector: from now on decode registers at once.
                    prefill.push_coords = push_coords(kv_params)
                figures["X-KVBridge-Prefill-Ms"] = f"{prefill_s * 1e3:.2f}"
                figures["X-KVBridge-Prefill-Backend"] = prefill.url
                metrics.prefill_latency(prefill_s)
                break
            except ClientDisconnected:
                metrics.request_done(kind, 499)
                metrics.failure("client_disconnected")
                return Response(status_code=499)
            except ClientError as e:  # the backend refused the request itself
                metrics.request_done(kind, e.status)
                return e.response()
            except (httpx.HTTPError, BackendError) as e:
                metrics.failure("prefill_error")
                logger.warning("kvbridge proxy: prefill at %s failed for %s: %s", prefill.url,
                               request_id, e)
                prefill.healthy = False
                prefill.last_error = str(e)
                metrics.backend_changed(prefill)
        figures["X-KVBridge-Mode"] = timeline.mode = mode
        if kv_params:
            nbytes = estimate_kv_bytes(kv_params, pool)
            if nbytes is not None:
                figures["X-KVBridge-KV-Bytes"] = str(nbytes)
                metrics.kv_bytes(nbytes)

        # -- decode -------------------------------------------------------
        decode = pool.pick("decode")
        if decode is None:
            metrics.request_done(kind, 503)
            metrics.failure("no_decode")
            refused = [b for b in pool.decode if b.quarantine]
            if refused:
                return error_response(503, "no decode instance is available: " + "; ".join(
                    f"{b.url}: {b.quarantine}" for b in refused), "service_unavailable",
                    code=ErrorCode.LAYOUT.value)
            return error_response(503, "no decode instance is available", "service_unavailable")
        figures["X-KVBridge-Decode-Backend"] = decode.url
        d_body = dict(body)
        if kv_params is not None:
            d_body["kv_transfer_params"] = kv_params
            metrics.paired(figures["X-KVBridge-Prefill-Backend"], decode.url)
        overhead = time.perf_counter() - t_arrival - float(
            figures.get("X-KVBridge-Prefill-Ms", 0)) / 1e3
        metrics.overhead(overhead)
        if stream:
            return StreamingResponse(
                stream_decode(client, decode, path, d_body, headers, kind, t_arrival,
                              timeline),
                media_type="text/event-stream", headers=figures)
        return await complete_decode(request, client, decode, path, d_body, headers, kind,
                                     figures, t_arrival, timeline)

    def start_streamed_prefill(request: Request, client, prefill: Backend, path: str,
                               body: dict, headers: dict, request_id: str, timeline) -> dict:
        """Send the prefill in the background; return decode's kv_transfer_params.
        A failed prefill fails decode's load (its producer refuses or is gone),
        and vLLM's kv_load_failure_policy applies there."""
        if can_stream(prefill):
            stream_id = f"kvbs-{uuid.uuid4().hex}"
            p_params, d_params = streamed_kv_params(prefill.describe, stream_id)
        else:
            # NixlPushConnector: prefill matches decode's registration by the
            # request id both get (X-Request-Id) and writes the KV into it.
            p_params = dict(PREFILL_KV_PARAMS)
            d_params = dict(prefill.push_coords, do_remote_prefill=True, do_remote_decode=False,
                            remote_block_ids=None,
                            remote_request_id=vllm_request_id(path, request_id))

        async def run() -> None:
            try:
                _, prefill_s = await run_prefill(request, client, prefill, path, body, headers,
                                                 kv_params=p_params, timeline=timeline)
                metrics.prefill_latency(prefill_s)
            except (ClientDisconnected, ClientError) as e:
                logger.info("kvbridge proxy: streamed prefill of %s ended: %s", request_id,
                            getattr(e, "message", e) or type(e).__name__)
            except (httpx.HTTPError, BackendError) as e:
                metrics.failure("prefill_error")
                logger.warning("kvbridge proxy: streamed prefill at %s failed for %s: %s",
                               prefill.url, request_id, e)
                prefill.healthy = False
                prefill.last_error = str(e)
                metrics.backend_changed(prefill)

        task = asyncio.create_task(run())
        state["prefills"].add(task)
        task.add_done_callback(state["prefills"].discard)
        return d_params

    async def run_prefill(request: Request, client, prefill: Backend, path: str, body: dict,
                          headers: dict, kv_params: dict | None = None, timeline=None):
        p_body = dict(body, max_tokens=1, stream=False,
                      kv_transfer_params=dict(kv_params or PREFILL_KV_PARAMS))
        if "max_completion_tokens" in p_body:
            p_body["max_completion_tokens"] = 1
        for key in ("stream_options", "min_tokens"):
            p_body.pop(key, None)
        prefill.outstanding += 1
        t0 = time.perf_counter()
        if timeline is not None:
            timeline.prefill_sent()
        try:
            # Once decode's first token is out, decode holds the KV: the client
            # leaving no longer makes this prefill's work moot.
            r = await post_unless_disconnected(
                request, client, prefill.url + path, p_body, headers,
                answered=None if timeline is None else timeline.decode_started)
        finally:
            prefill.outstanding -= 1
        prefill.served += 1
        if 400 <= r.status_code < 500:
            raise ClientError(r.status_code, _error_message(r), type_="invalid_request_error")
        if r.status_code != 200:
            raise BackendError(f"HTTP {r.status_code}: {_error_message(r)}")
        if timeline is not None:
            timeline.prefill_answered()
        return r.json().get("kv_transfer_params"), time.perf_counter() - t0

    async def complete_decode(request, client, decode: Backend, path, d_body, headers, kind,
                              figures, t_arrival, timeline) -> Response:
        decode.outstanding += 1
        t0 = time.perf_counter()
        try:
            r = await post_unless_disconnected(request, client, decode.url + path, d_body,
                                               headers)
        except ClientDisconnected:
            metrics.request_done(kind, 499)
            metrics.failure("client_disconnected")
            return Response(status_code=499)
        except httpx.HTTPError as e:
            metrics.failure("decode_error")
            metrics.request_done(kind, 502)
            logger.warning("kvbridge proxy: decode at %s failed for %s: %s: %s", decode.url,
                           headers.get("X-Request-Id"), type(e).__name__, e)
            decode.healthy = False
            # The type names the failure: httpx's ReadError and friends often
            # carry an empty message.
            return error_response(502, f"decode instance {decode.url} failed: "
                                  f"{type(e).__name__}: {e}", "decode_failed",
                                  code=http_failure_code(e))
        finally:
            decode.outstanding -= 1
        decode.served += 1
        if r.status_code == 200:
            timeline.first_token()  # a whole answer: its first token came with it
        elapsed = time.perf_counter() - t0
        metrics.decode_latency(elapsed)
        metrics.ttft(time.perf_counter() - t_arrival)
        if r.status_code == 200:
            try:
                kvp = r.json().get("kv_transfer_params") or {}
            except ValueError:
                kvp = {}
            if "kvbridge_transfer_ms" in kvp:
                figures["X-KVBridge-Transfer-Ms"] = str(kvp["kvbridge_transfer_ms"])
                figures["X-KVBridge-KV-Bytes"] = str(kvp["kvbridge_kv_bytes"])
        else:
            metrics.failure("decode_status")
        metrics.request_done(kind, r.status_code)
        out_headers = {k: v for k, v in figures.items()}
        return Response(r.content, status_code=r.status_code, headers=out_headers,
                        media_type=r.headers.get("content-type", "application/json"))

    async def stream_decode(client, decode: Backend, path, d_body, headers, kind, t_arrival,
                            timeline):
        decode.outstanding += 1
        t_last = None
        status = 200
        done_seen = False
        try:
            async with client.stream("POST", decode.url + path, json=d_body,
                                     headers=headers) as r:
                if r.status_code != 200:
                    status = r.status_code
                    body = (await r.aread()).decode(errors="replace")
                    metrics.failure("decode_status")
                    yield sse_error(f"decode instance answered HTTP {r.status_code}: {body}",
                                    "decode_failed", r.status_code)
                    return
                async for line in r.aiter_lines():
                    if not line:
                        continue
                    now = time.perf_counter()
                    if line.startswith("data:"):
                        if t_last is None:
                            metrics.ttft(now - t_arrival)
                            timeline.first_token()
                        else:
                            metrics.itl(now - t_last)
                        t_last = now
                        if line.strip() == "data: [DONE]":
                            done_seen = True
                    yield line + "\n\n"
            if not done_seen:
                status = 502
                metrics.failure("decode_truncated")
                yield sse_error("decode instance closed the stream before it finished",
                                "decode_failed", ErrorCode.PEER_GONE.value)
        except httpx.HTTPError as e:
            status = 502
            metrics.failure("decode_died")
            decode.healthy = False
            logger.error("kvbridge proxy: decode %s failed mid-stream: %s", decode.url, e)
            yield sse_error(f"decode instance {decode.url} failed mid-stream: "
                            f"{type(e).__name__}: {e}", "decode_failed", http_failure_code(e))
        finally:
            decode.outstanding -= 1
            decode.served += 1
            metrics.decode_latency(time.perf_counter() - t_arrival)
            metrics.request_done(kind, status)

    return app


class ClientDisconnected(Exception):
    pass


async def post_unless_disconnected(request: Request, client, url: str, body: dict,
                                   headers: dict, answered=None):
    """POST ``body`` to a backend; if the client leaves first, abort the
    backend's request (by closing its connection) and raise ClientDisconnected.

    ``answered``: a callable, True once the client has what it came for; from
    then on its leaving aborts nothing (a streamed prefill's own answer may
    come after decode's whole answer was sent and its connection closed)."""
    task = asyncio.ensure_future(client.post(url, json=body, headers=headers))
    while not task.done():
        done, _ = await asyncio.wait({task}, timeout=0.05)
        if answered is not None and answered():
            return await task
        if not done and await request.is_disconnected():
            task.cancel()
            raise ClientDisconnected()
    return task.result()


class BackendError(Exception):
    pass


def http_failure_code(e: httpx.HTTPError) -> str:
    """kvbridge's error code for a backend that failed at the HTTP level."""
    return (ErrorCode.TIMEOUT if isinstance(e, httpx.TimeoutException)
            else ErrorCode.PEER_GONE).value


def sse_error(message: str, type_: str, code: int | str) -> str:
    return "data: " + json.dumps({"error": {"message": message, "type": type_, "param": None,
                                            "code": code}}) + "\n\n"


def _error_message(r: httpx.Response) -> str:
    try:
        err = r.json().get("error")
        if isinstance(err, dict):
            return err.get("message") or r.text
        return str(err or r.text)
    except ValueError:
        return r.text[:500]


def estimate_kv_bytes(kv_params: dict, pool: BackendPool) -> int | None:
    """Bytes the decode instance will pull: blocks x bytes per block (all layers)."""
    ids = kv_params.get("remote_block_ids")
    if not ids:
        return None
    if ids and isinstance(ids[0], list):  # per KV-cache group
        ids = [b for group in ids for b in group]
    layout = next((b.layout for b in pool.prefill if b.layout is not None), None)
    if layout is None:
        return None
    return len(ids) * layout.bytes_per_block_all_layers

