"""Copy engines: one interface for asynchronous host<->device copies, two implementations.

`make_engine` picks one for a device; every `torch.cuda` call of the `offload` package is in
`offload.cuda_engine` (docs/design.md, "Devices"). The interface is `offload.engine_base`.

* `CudaCopyEngine`: dedicated H2D and D2H copy streams, blocking CUDA events (the host sleeps on them,
  never spins a core), pinned staging memory allocated at its exact size and registered with
  `cudaHostRegister` (PyTorch's caching host allocator would round each buffer up to a power of two),
  `non_blocking` copies, `record_stream` where a tensor crosses streams. Copies are timed with CUDA
  events only when `timing=True` (profiling); otherwise their times are host-side stamps (issue, and
  the watcher seeing completion). Never constructed without CUDA (it raises).
* `ThreadCopyEngine`: the CPU engine. Each direction has a real worker thread (PCIe is full duplex,
  like the two CUDA copy streams), events are `threading.Event`s, so ordering bugs and missing waits
  show up on a machine without a GPU. An optional simulated link (`link_gbps`, `latency_us`) makes
  each copy last at least `latency + bytes / bandwidth`, and a test-only `delay` injector makes races
  deterministic.

Both engines take `after=` (a marker from `mark_compute()`: the copy starts only after the compute
work issued so far) and `on_done=` (called with the event, from an engine thread, once the copy is
complete). Times on events are `time.perf_counter()` seconds, for the TrafficMeter.

Zero-copy: `alloc_mapped` gives host memory the device reads directly -- on CUDA pinned at its exact
size with `cudaHostRegister(..., cudaHostRegisterMapped)` and seen from the device at the same address
(unified virtual addressing) through `__cuda_array_interface__`, torch's own way to wrap foreign device
memory -- and `gather_mapped` reads rows of it by device ids into a device buffer, on the H2D stream:
the PCIe read is the gather, no host thread takes part. The thread engine's twin is an `index_select`
from the same host tensor on its H2D thread (simulated link included).
"""

from __future__ import annotations

import torch

from offload.cuda_engine import CudaCopyEngine, cuda_available
from offload.engine_base import CopyEngine, CopyEvent
from offload.thread_engine import ThreadCopyEngine

__all__ = ["CopyEvent", "CopyEngine", "ThreadCopyEngine", "CudaCopyEngine", "cuda_available", "make_engine"]


def make_engine(device, *, timing: bool = False) -> CopyEngine:
    """The default engine for `device`: CUDA engine for a CUDA device, thread engine for the CPU.
    `timing`: time every copy with CUDA events (profiling); the thread engine always stamps times."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return CudaCopyEngine(dev, timing=timing)
    if dev.type == "cpu":
        return ThreadCopyEngine()
    raise ValueError(f"device={device!r}: only 'cpu' and 'cuda[:N]' are supported")
