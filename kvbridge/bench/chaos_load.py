# SPDX-License-Identifier: Apache-2.0
"""The client side of ``kvbridge bench chaos``: prompts, one request with a
deadline and its classification, and the load generator.

Every request ends in exactly one outcome:

* ``ok``: HTTP 200 with a well-formed answer of exactly ``max_tokens`` tokens
  (``ignore_eos``, finish reason ``length``); a probe must also match the
  colocated reference token for token;
* ``error``: a clear error - an OpenAI error body, an SSE error event, or a
  refused connection;
* ``wrong``: an answer that looks complete but is not (wrong token count,
  malformed, a probe that differs from the reference);
* ``unclear``: a failure with no error message (a connection dropped mid-answer,
  a stream that stops without ``[DONE]`` and without an error event);
* ``hung``: no complete answer within the deadline.
"""

from __future__ import annotations

import json
import random
import re
import threading
import time
from dataclasses import dataclass

import httpx

MODEL = "tiny"
#: Prompt lengths in characters (~3 characters per token of the tiny model's
#: tokenizer: ~20 to ~1800 tokens) and how often each is drawn.
LOAD_LENGTHS = (60, 300, 1000, 3000, 5400)
LOAD_WEIGHTS = (3, 3, 2, 1, 1)
LOAD_MAX_TOKENS = (4, 8, 16)
PROBE_LENGTHS = (200, 700, 1500, 3600, 450, 2400, 900, 5000)
PROBE_MAX_TOKENS = 16


@dataclass
class Req:
    id: str
    prompt: str
    max_tokens: int
    chat: bool = False
    stream: bool = False
    probe: int | None = None
    #: sent as the body's kv_transfer_params (aimed requests: the benchmark
    #: plays the router and talks to the instances directly)
    kv_transfer_params: dict | None = None


def load_requests(n: int, seed: int, corpus: str) -> list[Req]:
    """Mixed lengths; 2 in 10 streamed, 1 in 10 a chat request."""
    out = []
    for i in range(n):
        rng = random.Random(seed * 1_000_003 + i)
        length = rng.choices(LOAD_LENGTHS, LOAD_WEIGHTS)[0]
        off = rng.randrange(0, len(corpus) - length)
        out.append(Req(f"chs-{i:05d}", f"request {i}: " + corpus[off:off + length],
                       rng.choice(LOAD_MAX_TOKENS), chat=i % 10 == 3, stream=i % 10 in (0, 5)))
    return out


def probe_requests(k: int, corpus: str) -> list[Req]:
    """The fixed subset checked against the colocated reference (distinct
    prefixes, so no prefix-cache block is shared with the load)."""
    out = []
    for j in range(k):
        length = PROBE_LENGTHS[j % len(PROBE_LENGTHS)]
        off = (7919 * (j + 1)) % (len(corpus) - length)
        out.append(Req(f"prb-{j}", f"probe {j}: " + corpus[off:off + length], PROBE_MAX_TOKENS,
                       probe=j))
    return out


def aimed_requests(tag: int, n: int, corpus: str) -> list[Req]:
    """Prompts of the requests aimed at fault ``tag`` (one block or more)."""
    out = []
    for k in range(n):
        off = (104_729 * (tag * 16 + k + 1)) % (len(corpus) - 1200)
        out.append(Req(f"aim-{tag}-{k}", f"aimed {tag}.{k}: " + corpus[off:off + 400 + 200 * k],
                       8))
    return out


def body_of(req: Req) -> tuple[str, dict]:
    body = {"model": MODEL, "max_tokens": req.max_tokens, "temperature": 0, "ignore_eos": True}
    if req.chat:
        body["messages"] = [{"role": "user", "content": req.prompt}]
    else:
        body["prompt"] = req.prompt
    if req.stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    if req.kv_transfer_params is not None:
        body["kv_transfer_params"] = req.kv_transfer_params
    return ("/v1/chat/completions" if req.chat else "/v1/completions"), body


class Normalizer:
    """Error messages as kinds: instance names for URLs, no ids or numbers."""

    def __init__(self, names: dict[str, str]):
        self.names = names

    def names_only(self, text: str) -> str:
        for url, name in self.names.items():
            text = text.replace(url, name)
        return text

    def __call__(self, text: str) -> str:
        keep = {}
        for k, (url, name) in enumerate(self.names.items()):
            keep[f"\x00{chr(65 + k)}\x00"] = name
            text = text.replace(url, f"\x00{chr(65 + k)}\x00")
        status = re.match(r"(HTTP \d{3} )", text)
        text = re.sub(r"[\w-]*(chs-\d{5}|prb-\d+|aim-\d+)[\w-]*", "<req>", text[len(status.group(1))
                                                                         if status else 0:])
        text = re.sub(r"\b[0-9a-f]{8,}\b", "<hex>", text)
        text = re.sub(r"\d+(\.\d+)*(:\d+)?", "N", text)
        for token, name in keep.items():
            text = text.replace(token, name)
        return ((status.group(1) if status else "") + " ".join(text.split()))[:160]


def send(client: httpx.Client, url: str, req: Req, deadline_s: float, norm: Normalizer,
         wire_id: str | None = None) -> dict:
    """One request through the router; returns its record (see module doc)."""
    path, body = body_of(req)
    rid = wire_id or req.id
    res: dict = {"id": rid, "probe": req.probe, "stream": req.stream, "chat": req.chat,
                 "max_tokens": req.max_tokens}
    timeout = httpx.Timeout(deadline_s, connect=10.0)
    t0 = time.monotonic()
    try:
        if req.stream:
            with client.stream("POST", url + path, json=body, headers={"X-Request-Id": rid},
                               timeout=timeout) as r:
                _headers(res, r)
                if r.status_code != 200:
                    r.read()
                    _http_error(res, r, norm)
                else:
                    _read_stream(res, r, req, t0, deadline_s, norm)
        else:
            r = client.post(url + path, json=body, headers={"X-Request-Id": rid},
                            timeout=timeout)
            _headers(res, r)
            if r.status_code != 200:
                _http_error(res, r, norm)
            else:
                _answer(res, r, req)
    except httpx.TimeoutException as e:
        res.update(outcome="hung", detail=f"no answer in {deadline_s:.0f} s "
                                          f"({type(e).__name__})")
    except httpx.ConnectError as e:  # nothing listens there: unambiguous, if terse
        res.update(outcome="error", detail=norm(f"cannot connect to {url}: {e}"))
    except httpx.HTTPError as e:
        res.update(outcome="unclear", detail=norm(f"{type(e).__name__}: {e}"))
    res["latency_s"] = round(time.monotonic() - t0, 3)
    if res.get("outcome") != "hung" and res["latency_s"] > deadline_s:
        res.update(outcome="hung", detail=f"answered after {res['latency_s']:.0f} s, past the "
                                          f"{deadline_s:.0f} s deadline")
    return res


def _headers(res: dict, r: httpx.Response) -> None:
    res["status"] = r.status_code
    res["mode"] = r.headers.get("x-kvbridge-mode")
    res["decode_backend"] = r.headers.get("x-kvbridge-decode-backend")
    res["prefill_backend"] = r.headers.get("x-kvbridge-prefill-backend")
    res["transfer_ms"] = r.headers.get("x-kvbridge-transfer-ms")


def _http_error(res: dict, r: httpx.Response, norm: Normalizer) -> None:
    try:
        err = r.json().get("error")
    except ValueError:
        err = None
    if isinstance(err, dict) and err.get("message"):
        res.update(outcome="error", detail=norm(f"HTTP {r.status_code} {err.get('type')}: "
                                                f"{err['message']}"))
    elif isinstance(err, str) and err:
        res.update(outcome="error", detail=norm(f"HTTP {r.status_code}: {err}"))
    else:
        res.update(outcome="unclear", detail=f"HTTP {r.status_code} with no error message: "
                                             f"{r.text[:80]!r}")


def _check(res: dict, req: Req, text, finish, completion_tokens) -> None:
    res["text"] = text
    res["completion_tokens"] = completion_tokens
    if not isinstance(text, str):
        res.update(outcome="wrong", detail="answer has no text")
    elif completion_tokens != req.max_tokens:
        res.update(outcome="wrong", detail=f"{completion_tokens} tokens, asked for "
                                           f"{req.max_tokens} (ignore_eos)")
    elif finish != "length":
        res.update(outcome="wrong", detail=f"finish_reason {finish!r}, expected 'length'")
    else:
        res["outcome"] = "ok"


def _answer(res: dict, r: httpx.Response, req: Req) -> None:
    try:
        data = r.json()
        c = data["choices"][0]
        text = c.get("text") if "text" in c else (c.get("message") or {}).get("content")
        res["prompt_tokens"] = data.get("usage", {}).get("prompt_tokens")
        res["kv_transfer_params"] = data.get("kv_transfer_params")
        _check(res, req, text, c.get("finish_reason"),
               (data.get("usage") or {}).get("completion_tokens"))
    except (ValueError, KeyError, IndexError, TypeError) as e:
        res.update(outcome="wrong", detail=f"HTTP 200 with a malformed body ({e!r})")


def _read_stream(res, r, req, t0, deadline_s, norm) -> None:
    pieces, finish, usage, done = [], None, None, False
    for line in r.iter_lines():
        if time.monotonic() - t0 > deadline_s:
            res.update(outcome="hung", detail=f"stream still open after {deadline_s:.0f} s")
            return
        if not line.startswith("data:"):
            continue
        payload = line[5:].strip()
        if payload == "[DONE]":
            done = True
            continue
        try:
            ev = json.loads(payload)
        except ValueError:
            res.update(outcome="wrong", detail=f"malformed SSE event {payload[:60]!r}")
            return
        if "error" in ev:
            e = ev["error"] if isinstance(ev["error"], dict) else {"message": str(ev["error"])}
            res.update(outcome="error", detail=norm(f"stream error {e.get('type')}: "
                                                    f"{e.get('message')}"))
            return
        usage = ev.get("usage") or usage
        for c in ev.get("choices") or []:
            piece = c.get("text") if "text" in c else (c.get("delta") or {}).get("content")
            if piece:
                pieces.append(piece)
            finish = c.get("finish_reason") or finish
    if not done:
        res.update(outcome="unclear", detail="stream ended without [DONE] and without an "
                                             "error event")
        return
    res["prompt_tokens"] = (usage or {}).get("prompt_tokens")
    _check(res, req, "".join(pieces), finish, (usage or {}).get("completion_tokens"))


class Load:
    """``n`` requests from ``concurrency`` client threads (closed loop). While
    ``trickle_s`` is set (a fault is recovering) sends are spaced that far
    apart and at most ``trickle_budget`` are sent (then sending waits for the
    recovery), so a 30 s restart does not use up the request budget;
    ``pause()`` drains the load for a probe round."""

    def __init__(self, url: str, reqs: list[Req], concurrency: int, deadline_s: float,
                 norm: Normalizer, clock):
        self.url, self.reqs, self.concurrency = url, reqs, concurrency
        self.deadline_s, self.norm, self.clock = deadline_s, norm, clock
        self.results: list[dict | None] = [None] * len(reqs)
        self.phase = "clean"
        self.trickle_s: float | None = None
        self.trickle_budget = len(reqs)
        self._trickled = 0
        self.inflight = 0
        self._next = 0
        self._last_send = 0.0
        self._lock = threading.Lock()
        self.running = threading.Event()
        self.running.set()
        self._threads: list[threading.Thread] = []
        self.client = httpx.Client(limits=httpx.Limits(max_connections=concurrency + 8,
                                                       max_keepalive_connections=concurrency))

    @property
    def sent(self) -> int:
        return self._next

    def finished(self) -> bool:
        return not any(t.is_alive() for t in self._threads)

    def start(self) -> None:
        for k in range(self.concurrency):
            t = threading.Thread(target=self._worker, name=f"chaos-client-{k}", daemon=True)
            t.start()
            self._threads.append(t)

    def join(self, timeout: float | None = None) -> None:
        end = None if timeout is None else time.monotonic() + timeout
        for t in self._threads:
            t.join(None if end is None else max(0.0, end - time.monotonic()))
        self.client.close()

    def _take(self) -> tuple[int, str] | None:
        while True:
            self.running.wait()
            wait = 0.0
            with self._lock:
                if self._next >= len(self.reqs):
                    return None
                if self.running.is_set():
                    now = time.monotonic()
                    if self.trickle_s:
                        wait = (self._last_send + self.trickle_s - now
                                if self._trickled < self.trickle_budget else 0.2)
                    if wait <= 0:
                        if self.trickle_s:
                            self._trickled += 1
                        i = self._next
                        self._next += 1
                        self._last_send = now
                        self.inflight += 1
                        return i, self.phase
            if wait > 0:
                time.sleep(min(wait, 0.2))

    def _worker(self) -> None:
        while (took := self._take()) is not None:
            i, phase = took
            t_send = self.clock()
            try:
                res = send(self.client, self.url, self.reqs[i], self.deadline_s, self.norm)
            except Exception as e:  # noqa: BLE001 - a bug here must not lose the request
                res = {"id": self.reqs[i].id, "outcome": "unclear",
                       "detail": f"client error {e!r}"}
            res.update(index=i, phase=phase, t_send=round(t_send, 2))
            self.results[i] = res
            with self._lock:
                self.inflight -= 1

    def stop(self) -> None:
        """Send nothing more (requests in flight still finish)."""
        with self._lock:
            self.reqs = self.reqs[:self._next]
        self.running.set()

    def trickle(self, interval_s: float | None, budget: int = 0) -> None:
        """Space sends ``interval_s`` apart, at most ``budget`` of them (None: full speed)."""
        with self._lock:
            self.trickle_s, self.trickle_budget, self._trickled = interval_s, budget, 0

    def pause(self) -> float:
        """Stop sending and wait for in-flight requests; returns seconds waited."""
        t0 = time.monotonic()
        with self._lock:
            self.running.clear()
        limit = t0 + self.deadline_s + 15
        while self.inflight and time.monotonic() < limit:
            time.sleep(0.05)
        return time.monotonic() - t0

    def resume(self) -> None:
        self.running.set()
