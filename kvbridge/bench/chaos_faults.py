# SPDX-License-Identifier: Apache-2.0
"""The faults of ``kvbridge bench chaos`` (see ``chaos`` for the schedule).

Each fault marks what it does before doing it (so the crash monitor does not
count it), slows the load to a trickle until it has recovered, and records
when the proxy's ``/health`` showed the instance leave and rejoin rotation.

Whether a load request happens to be mid-transfer when a fault hits is up to
timing, so some faults also get *aimed* requests: the benchmark plays the
router for a few requests - prefill step on the producer, then the fault, then
the decode step with the producer's ``kv_transfer_params`` - so that a pull
from a dead producer, from a stopped one, and into a decode instance with
another layout (which kvbridge proxy would never pair, but a router without
the layout pre-check would) happen on every run.
"""

from __future__ import annotations

import threading
import time

import httpx

from kvbridge.bench.chaos_load import Req, aimed_requests, send

#: kv_connector_extra_config key of the connector's fault injection: the
#: consumer flips one byte of every Nth landed pull before verifying it.
FLIP_KEY = "fault_flip_byte_every"


class Faults:
    """Mixed into ``chaos.Chaos``: needs ``plan``, ``stack``, ``load``, ``flip``,
    ``prefill``, ``decode``, ``mismatch``, ``norm``, ``clock``, ``say`` and
    ``begin_recovery``/``end_recovery``."""

    def _aim_prefill(self, ev: dict) -> list[Req]:
        """The prefill step of this fault's aimed requests, on the producer."""
        from kvbridge.serve.proxy.app import PREFILL_KV_PARAMS

        tag = len(self.faults)
        reqs = aimed_requests(tag, self.plan["aimed_per_fault"], self.corpus)
        ready = []
        with httpx.Client() as c:
            for k, r in enumerate(reqs):
                step = Req(r.id, r.prompt, 1, kv_transfer_params=dict(PREFILL_KV_PARAMS))
                res = send(c, self.prefill.url, step, 30.0, self.norm, wire_id=f"aimp-{tag}-{k}")
                if res.get("outcome") == "ok" and res.get("kv_transfer_params"):
                    r.kv_transfer_params = res["kv_transfer_params"]
                    ready.append(r)
        ev["aimed"] = {"prefilled": len(ready), "of": len(reqs)}
        return ready

    def _aim_decode(self, reqs: list[Req], inst, ev: dict) -> None:
        """Their decode steps, all at once, to ``inst`` (answers are collected
        in the background)."""
        ev["aimed"]["decode_at"] = inst.name

        def go(r: Req) -> None:
            t_send = round(self.clock(), 2)
            with httpx.Client() as c:
                res = send(c, inst.url, r, self.plan["deadline_s"], self.norm)
            res.update(phase=ev["fault"], aimed_at=inst.name, t_send=t_send)
            self.aimed.append(res)

        for r in reqs:
            t = threading.Thread(target=go, args=(r,), daemon=True, name=f"aimed-{r.id}")
            t.start()
            self.aimed_threads.append(t)

    def _fault(self, name: str, target, **kw) -> dict:
        ev = {"fault": name, "fired": True, "target": target.name,
              "t_s": round(self.clock(), 1), "request_index": self.load.sent, **kw}
        self.faults.append(ev)
        self.load.phase = name
        self.begin_recovery()
        self.say(f"FAULT {name} on {target.name} at request {ev['request_index']}")
        return ev

    def _recovered(self, ev: dict) -> None:
        ev["recovered_after_s"] = round(self.clock() - ev["t_s"], 1)
        self.end_recovery()
        self.load.phase = f"after {ev['fault']}"
        self.say(f"{ev['fault']} recovered after {ev['recovered_after_s']} s")

    def _sees(self, inst, up: bool, timeout: float) -> float | None:
        if up:
            def pred(b):
                return b["healthy"] and not b["quarantine"]
        else:
            def pred(b):
                return not b["healthy"]
        s = self.stack.wait_proxy_sees(inst.url, pred, timeout)
        return None if s is None else round(s, 2)

    def kill_prefill(self) -> None:
        ev = self._fault("kill_prefill", self.prefill, action="SIGKILL of the process group, "
                         "restart on the same port; aimed: decode0 pulls from the dead producer")
        aimed = self._aim_prefill(ev)
        self.stack.kill(self.prefill)
        self._aim_decode(aimed, self.decode, ev)
        ev["proxy_noticed_down_s"] = self._sees(self.prefill, False, 15)
        self.stack.start(self.prefill)
        self.stack.wait_up(self.prefill)
        ev["restarted_s"] = round(self.clock() - ev["t_s"], 1)
        ev["proxy_back_in_rotation_s"] = self._sees(self.prefill, True, 30)
        self._recovered(ev)

    def sigstop_prefill(self) -> None:
        stop_s = self.plan["sigstop_s"]
        timeout = self.plan["kvbridge_extra_config"]["transfer_timeout_s"]
        ev = self._fault("sigstop_prefill", self.prefill, action=f"SIGSTOP for {stop_s:.0f} s "
                         f"(transfer timeout {timeout:.0f} s), then SIGCONT; aimed: decode0 "
                         "pulls from the stopped producer")
        aimed = self._aim_prefill(ev)
        t0 = time.monotonic()
        self.stack.sigstop(self.prefill)
        self._aim_decode(aimed, self.decode, ev)
        try:
            ev["proxy_noticed_down_s"] = self._sees(self.prefill, False, stop_s - 0.5)
            time.sleep(max(0.0, stop_s - (time.monotonic() - t0)))
        finally:
            self.stack.sigcont(self.prefill)
        ev["proxy_back_in_rotation_s"] = self._sees(self.prefill, True, 30)
        self._recovered(ev)

    def kill_decode(self) -> None:
        every = self.flip["every"]
        ev = self._fault("kill_decode", self.decode, action="SIGKILL of the process group, "
                         "restart on the same port"
                         + (f" with {FLIP_KEY}={every}" if every else ""))
        self.stack.kill(self.decode)
        ev["proxy_noticed_down_s"] = self._sees(self.decode, False, 15)
        self.stack.start(self.decode, extra={FLIP_KEY: every} if every else {})
        self.stack.wait_up(self.decode)
        if every:
            self.flip["active_on"] = self.decode.current.label
            self.flip["from_t_s"] = round(self.clock(), 1)
        else:
            self.flip["note"] = "off (--flip-every 0)"
        ev["restarted_s"] = round(self.clock() - ev["t_s"], 1)
        ev["proxy_back_in_rotation_s"] = self._sees(self.decode, True, 30)
        self._recovered(ev)

    def mismatched_decode_joins(self) -> None:
        ev = self._fault("mismatched_decode_joins", self.mismatch,
                         action="a decode instance with block size 64 starts on a URL the "
                         f"proxy lists (kv_load_failure_policy {self.mismatch.policy}); "
                         "aimed: prefill0's KV sent to it directly (refused)")
        self.stack.start(self.mismatch)
        self.stack.wait_up(self.mismatch)
        ev["restarted_s"] = round(self.clock() - ev["t_s"], 1)
        s = self.stack.wait_proxy_sees(self.mismatch.url,
                                       lambda b: b["healthy"] and bool(b["quarantine"]), 30)
        ev["proxy_quarantined_s"] = None if s is None else round(s, 2)
        q = (self.stack.proxy_backends().get(self.mismatch.url) or {}).get("quarantine")
        ev["quarantine"] = self.norm.names_only(q) if q else None
        self._aim_decode(self._aim_prefill(ev), self.mismatch, ev)
        self._recovered(ev)
