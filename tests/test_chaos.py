# SPDX-License-Identifier: Apache-2.0
"""``kvbridge bench chaos``: how requests are classified (fast, no engine), and
the quick mode end to end with real vLLM servers (``vllm`` mark)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from kvbridge.bench.chaos_load import Normalizer, Req, load_requests, probe_requests, send
from kvbridge.bench.chaos_report import ROWS

KVBRIDGE = shutil.which("kvbridge", path=str(Path(sys.executable).parent)) or "kvbridge"
URL = "http://router"
NORM = Normalizer({"http://127.0.0.1:8200": "decode0"})


def _send(handler, req: Req, deadline_s: float = 5.0) -> dict:
    with httpx.Client(transport=httpx.MockTransport(handler)) as c:
        return send(c, URL, req, deadline_s, NORM)


def _completion(tokens: int, finish: str = "length", text: str = "abc") -> dict:
    return {"choices": [{"text": text, "finish_reason": finish}],
            "usage": {"prompt_tokens": 10, "completion_tokens": tokens}}


def _sse(*events) -> bytes:
    return b"".join(b"data: " + (e if isinstance(e, bytes) else json.dumps(e).encode())
                    + b"\n\n" for e in events)


REQ = Req("chs-00001", "hello", 4)
STREAM = Req("chs-00002", "hello", 2, stream=True)


def test_well_formed_answer_is_ok_and_keeps_the_router_figures():
    r = _send(lambda q: httpx.Response(200, json=_completion(4), headers={
        "x-kvbridge-mode": "disaggregated", "x-kvbridge-transfer-ms": "1.5"}), REQ)
    assert r["outcome"] == "ok" and r["mode"] == "disaggregated" and r["transfer_ms"] == "1.5"


@pytest.mark.parametrize("body,why", [
    (_completion(3), "3 tokens, asked for 4"),
    (_completion(4, finish="stop"), "finish_reason 'stop'"),
    ({"choices": []}, "malformed"),
])
def test_answers_that_look_complete_but_are_not_are_wrong(body, why):
    r = _send(lambda q: httpx.Response(200, json=body), REQ)
    assert r["outcome"] == "wrong" and why in r["detail"]


def test_openai_error_body_is_a_clear_error_with_a_stable_kind():
    r = _send(lambda q: httpx.Response(502, json={"error": {
        "message": "decode instance http://127.0.0.1:8200 failed: ReadError: ",
        "type": "decode_failed"}}), REQ)
    assert r["outcome"] == "error"
    assert r["detail"] == "HTTP 502 decode_failed: decode instance decode0 failed: ReadError:"


def test_error_without_a_message_is_unclear():
    r = _send(lambda q: httpx.Response(500, text="Internal Server Error"), REQ)
    assert r["outcome"] == "unclear"


def test_timeout_is_hung_a_dropped_connection_unclear_a_refused_one_clear():
    def slow(q):
        raise httpx.ReadTimeout("timed out", request=q)

    def dropped(q):
        raise httpx.RemoteProtocolError("peer closed connection", request=q)

    def refused(q):
        raise httpx.ConnectError("[Errno 111] Connection refused", request=q)

    assert _send(slow, REQ)["outcome"] == "hung"
    assert _send(dropped, REQ)["outcome"] == "unclear"
    assert _send(refused, REQ)["outcome"] == "error"


def test_streams():
    tok = {"choices": [{"text": "a", "finish_reason": None}]}
    last = {"choices": [{"text": "b", "finish_reason": "length"}]}
    usage = {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}}
    ok = _send(lambda q: httpx.Response(200, content=_sse(tok, last, usage, b"[DONE]")), STREAM)
    assert ok["outcome"] == "ok" and ok["text"] == "ab"
    err = {"error": {"message": "decode instance failed mid-stream", "type": "decode_failed"}}
    assert _send(lambda q: httpx.Response(200, content=_sse(tok, err)),
                 STREAM)["outcome"] == "error"
    cut = _send(lambda q: httpx.Response(200, content=_sse(tok)), STREAM)
    assert cut["outcome"] == "unclear" and "[DONE]" in cut["detail"]
    short = _send(lambda q: httpx.Response(200, content=_sse(tok, usage | {"usage": {
        "completion_tokens": 1}}, b"[DONE]")), STREAM)
    assert short["outcome"] == "wrong"


def test_prompts_are_deterministic_mixed_and_probes_share_no_prefix_with_the_load():
    corpus = "".join(chr(97 + i % 26) for i in range(20000))
    a, b = load_requests(50, 0, corpus), load_requests(50, 0, corpus)
    assert [r.prompt for r in a] == [r.prompt for r in b]
    assert len({len(r.prompt) // 100 for r in a}) >= 3  # mixed lengths
    assert any(r.stream for r in a) and any(r.chat for r in a)
    probes = probe_requests(4, corpus)
    assert all(p.prompt.startswith(f"probe {p.probe}: ") for p in probes)
    assert not any(r.prompt.startswith("probe") for r in a)


@pytest.mark.vllm
@pytest.mark.timeout(1800)
def test_chaos_quick_end_to_end(tmp_path):
    out = tmp_path / "chaos.json"
    env = {**os.environ, "KVBRIDGE_RESULTS_DIR": str(tmp_path)}
    proc = subprocess.Popen([KVBRIDGE, "bench", "chaos", "--quick", "--json", str(out),
                             "--log-dir", str(tmp_path / "logs")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        stdout, stderr = proc.communicate(timeout=1500)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # the benchmark stops its servers on SIGTERM
        stdout, stderr = proc.communicate(timeout=120)
        pytest.fail(f"kvbridge bench chaos --quick ran past 1500 s:\n{stderr[-3000:]}")
    assert proc.returncode == 0, stdout[-3000:] + stderr[-5000:]
    data = json.loads(out.read_text())
    assert (tmp_path / "chaos-quick.md").exists() and (tmp_path / "chaos-quick.json").exists()
    assert data["command"].startswith("kvbridge bench chaos --quick")

    # -- the table's structure
    for _, label in ROWS:
        assert label in stdout, label
    s = data["summary"]
    assert set(s) == {key for key, _ in ROWS}
    assert s["sent"]["load"] == 200 and s["sent"]["probes"] == 4 * len(data["probe_rounds"])
    for part in ("load", "probes", "aimed"):  # every request has exactly one outcome
        assert sum(s[k][part] for k in ("ok", "error", "wrong", "unclear", "hung")) \
            == s["sent"][part], part
    assert data["plan"]["policies"] == {"decode0": "recompute", "decode-mismatch": "fail"}
    assert data["plan"]["concurrency"] == 16
    assert [f["fault"] for f in data["faults"] if f["fired"]] == \
        [name for _, name in data["plan"]["schedule"]]
    faults = {f["fault"]: f for f in data["faults"]}
    for name in ("kill_prefill", "sigstop_prefill", "kill_decode"):
        # the proxy noticed the instance go and come back
        assert faults[name]["proxy_noticed_down_s"] is not None, faults[name]
        assert faults[name]["proxy_back_in_rotation_s"] is not None, faults[name]
    assert faults["mismatched_decode_joins"]["quarantine"], faults["mismatched_decode_joins"]
    for name in ("kill_prefill", "sigstop_prefill", "mismatched_decode_joins"):
        aimed = faults[name]["aimed"]  # the benchmark's own P/D requests at the fault
        assert aimed["prefilled"] == aimed["of"] == 3 and "decode_at" in aimed, faults[name]
    assert s["sent"]["aimed"] == 9
    assert "disaggregated" not in data["routed_to_mismatched_decode"]
    flip = data["flipped_byte"]
    assert flip["active_on"], flip  # the flipped byte fires on every run

    # -- the goals
    assert s["wrong"]["total"] == 0, data["problems"]["wrong"]
    assert s["hung"]["total"] == 0, data["problems"]["hung"]
    # A refused or failed KV load once killed the decode EngineCore (`assert
    # req_id in self.requests` in vLLM's scheduler) on every run, for
    # decode-mismatch under policy `fail`: issue 11's connector fix.
    assert (s["engine_crashes"]["total"], s["leaked"]["total"]) == (0, 0), \
        {"crashes": data["crashes"], "leaked": data["leaked"]}
