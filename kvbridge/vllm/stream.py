# SPDX-License-Identifier: Apache-2.0
"""Streamed requests: decode asks for the KV while prefill still computes it.

``kvbridge proxy --kv-mode stream`` sends a request to the prefill and the
decode instance at once, both carrying one stream id it made up:

* prefill: ``kv_transfer_params = {"do_remote_decode": true,
  "kvbridge_stream_id": S}``. ``StreamTracker`` (scheduler side) follows the
  request's blocks step by step from vLLM's ``SchedulerOutput``; after each
  step's forward pass the worker publishes every block computed so far under
  ``S`` (``Transport.publish_progress``) - with chunked prefill, one chunk's
  blocks at a time. When the request finishes, vLLM keeps its blocks until a
  consumer read them, as for a pulled request.
* decode: ``{"do_remote_prefill": true, "kvbridge_stream": true,
  "remote_request_id": S, "remote_addresses": [...], "kvbridge": version}``.
  Its blocks are allocated at once; the worker reads them by position in
  chunks of ``stream_chunk_blocks`` (``tail_positions``), each granted by
  the producer the moment prefill computed its blocks. When prefill ends,
  only the last chunk is left to move.

One KV cache group only (a hybrid model's sliding-window group drops blocks
while prefill runs): ``describe()`` advertises streaming only then, and the
proxy pulls for the others.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from kvbridge.vllm.metadata import StreamSpec

#: kv_transfer_params keys of a streamed request
STREAM_ID_KEY = "kvbridge_stream_id"   # prefill side: the id to publish under
STREAM_KEY = "kvbridge_stream"         # decode side: read remote_request_id by position


@dataclass
class _Stream:
    stream_id: str
    num_prompt_tokens: int
    block_ids: list[int] = field(default_factory=list)
    published: int = 0
    complete: bool = False


class StreamTracker:
    """Producer scheduler side: the blocks of each streamed request, and
    which of them each step computes."""

    def __init__(self, block_size: int):
        self.block_size = block_size
        self._streams: dict[str, _Stream] = {}

    def add(self, request_id: str, stream_id: str, num_prompt_tokens: int) -> None:
        self._streams.setdefault(request_id, _Stream(stream_id, num_prompt_tokens))

    def stream_id(self, request_id: str) -> str | None:
        stream = self._streams.get(request_id)
        return stream.stream_id if stream else None

    def pop(self, request_id: str) -> str | None:
        stream = self._streams.pop(request_id, None)
        return stream.stream_id if stream else None

    def step(self, scheduler_output) -> dict[str, StreamSpec]:
        """What this step makes readable: per streamed request scheduled in
        it, every block computed once its forward pass ran."""
        if not self._streams:
            return {}
        computed: dict[str, int] = {}
        for new in scheduler_output.scheduled_new_reqs:
            stream = self._streams.get(new.req_id)
            if stream is not None:
                stream.block_ids = list(new.block_ids[0])
                computed[new.req_id] = new.num_computed_tokens
        cached = scheduler_output.scheduled_cached_reqs
        resumed = getattr(cached, "resumed_req_ids", None) or set()
        for i, req_id in enumerate(cached.req_ids):
            stream = self._streams.get(req_id)
            if stream is None:
                continue
            new_ids = cached.new_block_ids[i]
            if new_ids is not None:
                if req_id in resumed:
                    stream.block_ids = list(new_ids[0])  # preempted: new blocks
                else:
                    stream.block_ids.extend(new_ids[0])
            computed[req_id] = cached.num_computed_tokens[i]
        out: dict[str, StreamSpec] = {}
        for req_id, before in computed.items():
            stream = self._streams[req_id]
            if stream.complete:
                continue
            done = before + scheduler_output.num_scheduled_tokens.get(req_id, 0)
            complete = done >= stream.num_prompt_tokens
            n = (math.ceil(stream.num_prompt_tokens / self.block_size) if complete
                 else done // self.block_size)
            n = min(n, len(stream.block_ids))
            if n > stream.published or complete:
                stream.published, stream.complete = n, complete
                out[req_id] = StreamSpec(stream.stream_id, stream.block_ids[:n], complete)
        return out


def tail_positions(num_prompt_tokens: int, block_size: int, num_local_blocks: int) -> list[int]:
    """Consumer side: the positions (in the producer's block list) of the
    last ``num_local_blocks`` blocks of a prompt - those the local prefix
    cache does not hold - first to last."""
    total = math.ceil(num_prompt_tokens / block_size)
    return list(range(max(0, total - num_local_blocks), total))
