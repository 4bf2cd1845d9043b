#!/usr/bin/env python3
"""NIXL's own agent loop, the reference for kvtier's NIXL transport.

Two processes, NIXL agents with the UCX backend, DRAM to DRAM: the sender WRITEs
N chunks of CHUNK bytes into the receiver's buffer (scattered in reverse, as
`kvtier bench transfer` does) and polls the transfer state until DONE. Prints GiB/s
per iteration and the best. Needs the nixl-cu12 wheel and numpy (scripts/test.sh
installs both into target/py):

    target/py/bin/python benches/nixl_agent_loop.py --chunks 30 --chunk-mib 32
"""
import argparse
import multiprocessing as mp
import time

import numpy as np
from nixl_cu12 import nixl_agent, nixl_agent_config


def receiver(size, md_out, done_in):
    agent = nixl_agent("kvtier-ref-receiver", nixl_agent_config(backends=["UCX"]))
    dst = np.zeros(size, dtype=np.uint8)
    reg = agent.register_memory([(dst.ctypes.data, size, 0, "")], "DRAM")
    md_out.send((agent.get_agent_metadata(), dst.ctypes.data))
    expected = done_in.recv()
    ok = int(dst[: len(expected)].sum()) == sum(expected)  # cheap spot check
    md_out.send(ok)
    agent.deregister_memory(reg)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--chunks", type=int, default=30)
    p.add_argument("--chunk-mib", type=int, default=32)
    p.add_argument("--iterations", type=int, default=5)
    a = p.parse_args()
    chunk = a.chunk_mib << 20
    size = a.chunks * chunk
    md_recv, md_send = mp.Pipe(duplex=False)
    done_recv, done_send = mp.Pipe(duplex=False)
    child = mp.Process(target=receiver, args=(size, md_send, done_recv))
    child.start()
    metadata, remote_base = md_recv.recv()
    agent = nixl_agent("kvtier-ref-sender", nixl_agent_config(backends=["UCX"]))
    src = np.random.default_rng(1).integers(0, 255, size, dtype=np.uint8)
    reg = agent.register_memory([(src.ctypes.data, size, 0, "")], "DRAM")
    name = agent.add_remote_agent(metadata)
    local = [(src.ctypes.data + i * chunk, chunk, 0) for i in range(a.chunks)]
    remote = [(remote_base + (a.chunks - 1 - i) * chunk, chunk, 0) for i in range(a.chunks)]
    handle = agent.initialize_xfer(
        "WRITE", agent.get_xfer_descs(local, "DRAM"), agent.get_xfer_descs(remote, "DRAM"), name
    )
    times = []
    for i in range(a.iterations):
        t = time.perf_counter()
        state = agent.transfer(handle)
        while state not in ("DONE", "ERR"):
            state = agent.check_xfer_state(handle)
        if state == "ERR":
            raise SystemExit("NIXL transfer failed")
        times.append(time.perf_counter() - t)
        print(f"  nixl agent loop iteration {i + 1}/{a.iterations}: {size / times[-1] / 2**30:.2f} GiB/s")
    last = src[(a.chunks - 1) * chunk : a.chunks * chunk][:4096]
    done_send.send([int(x) for x in last])
    ok = md_recv.recv()
    child.join()
    agent.release_xfer_handle(handle)
    agent.deregister_memory(reg)
    print(f"nixl agent loop: {a.chunks} x {a.chunk_mib} MiB, best {size / min(times) / 2**30:.2f} GiB/s, "
          f"mean {size * len(times) / sum(times) / 2**30:.2f} GiB/s, data {'OK' if ok else 'WRONG'}")


if __name__ == "__main__":
    main()
