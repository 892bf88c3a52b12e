"""A second CUDA stream for the frozen teachers (``train.overlap_teachers``), so their forward overlaps the student's.

The teachers (EMA teacher, DINOv3, a domain teacher) need nothing from the student and run without
gradients, so the GPU can run their kernels beside the student's forward instead of before it: a
ViT's large matmuls beside Swin's many memory-bound small kernels. Recorded into a CUDA graph
(``train.cuda_graph``), the fork and join become two parallel branches of the graph.

Memory stays safe without ``record_stream`` as long as all side-stream work goes through one
:meth:`SideStream.fork` per join: the side stream waits for the default stream before each fork (so it
never reuses a block the previous step still reads), and the default stream waits for the side stream
at the join, before anything reads the teachers' outputs or frees the views they read. It does not
hold for Inductor's per-region CUDA graphs (``train.compile_mode=reduce-overhead``), which share one
memory pool replayed in order, so the config refuses that combination. The caching allocator keeps
each stream's free blocks apart, so the teachers' working memory now adds to the student's peak
instead of reusing it. Off CUDA, or disabled, everything runs in order on the current stream.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")


class SideStream:
    """Fork work onto a second stream of ``device`` and join it back (a no-op off CUDA or when disabled).

    Args:
        device: the device the work runs on.
        enabled: ``train.overlap_teachers``.
    """

    def __init__(self, device: torch.device | str, enabled: bool) -> None:
        device = torch.device(device)
        self.stream = torch.cuda.Stream(device) if enabled and device.type == "cuda" else None
        self.forked = False

    def fork(self, fn: Callable[..., T], *args: object) -> T:
        """Run ``fn(*args)`` on the side stream, after everything queued so far on the current one.

        If ``fn`` raises, the side stream is joined before the exception goes on.

        Raises:
            RuntimeError: called again before :meth:`join`.
        """
        if self.stream is None:
            return fn(*args)
        if self.forked:
            raise RuntimeError("SideStream.fork called twice without a join")
        main = torch.cuda.current_stream(self.stream.device)
        self.stream.wait_stream(main)
        self.forked = True
        try:
            with torch.cuda.stream(self.stream):
                return fn(*args)
        except BaseException:
            self.join()
            raise

    def join(self) -> None:
        """Make the current stream wait for the work forked so far."""
        if self.stream is None or not self.forked:
            return
        torch.cuda.current_stream(self.stream.device).wait_stream(self.stream)
        self.forked = False
