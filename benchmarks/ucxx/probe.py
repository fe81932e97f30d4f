# SPDX-License-Identifier: Apache-2.0
"""Why kvbridge has no ucxx backend: ucxx's own best case, measured.

Two processes on 127.0.0.1 with ucxx's async API (the maintained successor of
ucx-py, which has no installable wheel here): the client asks for N bytes,
the server sends one contiguous numpy buffer, the client receives into a
preallocated one - no scattered blocks, no layout checks, ucxx's best case.

Run in a separate environment (ucxx pulls rmm/libucx, ~350 MB):
    python3 -m venv /tmp/ucxxv && /tmp/ucxxv/bin/pip install ucxx-cu12 numpy
    UCX_NET_DEVICES=lo /tmp/ucxxv/bin/python benchmarks/ucxx/probe.py
"""
import asyncio, os, time, multiprocessing as mp
os.environ.setdefault("UCX_NET_DEVICES", "lo")
import numpy as np
SIZES = [1 << 20, 64 << 20]
def server(q):
    import ucxx
    async def main():
        bufs = {n: np.ones(n, dtype=np.uint8) for n in SIZES}
        done = asyncio.Event()
        async def handler(ep):
            for n in SIZES:
                for _ in range(6):
                    req = np.empty(1, dtype=np.uint64); await ep.recv(req)
                    await ep.send(bufs[int(req[0])])
            await ep.close(); done.set()
        lf = ucxx.create_listener(handler, port=0)
        q.put(lf.port)
        await done.wait()
    asyncio.run(main())
def client(port):
    import ucxx
    async def main():
        ep = await ucxx.create_endpoint("127.0.0.1", port)
        for n in SIZES:
            out = np.empty(n, dtype=np.uint8); ts = []
            for _ in range(6):
                t0 = time.perf_counter()
                await ep.send(np.array([n], dtype=np.uint64)); await ep.recv(out)
                ts.append(time.perf_counter() - t0)
            ts = sorted(ts[1:]); med = ts[len(ts)//2]
            print(f"ucxx {n>>20} MiB: {n/med/1e9:.2f} GB/s ({med*1e6:.0f} us) UCX_TLS={os.environ.get('UCX_TLS','default')}", flush=True)
        await ep.close()
    asyncio.run(main())
if __name__ == "__main__":
    ctx = mp.get_context("spawn"); q = ctx.Queue()
    p = ctx.Process(target=server, args=(q,)); p.start()
    try:
        client(q.get(timeout=60))
    finally:
        p.join(30)
        if p.is_alive(): p.kill()
