"""Compiled code kept with the run, so a resumed run, a restarted worker or another trial skips compiling.

With ``train.compile`` the first step compiles every Swin block: minutes on an H100, most of it Triton
code generation (``bench/RESULTS.md``). PyTorch can serialise what it compiled (Inductor code, AOTAutograd
graphs, autotuning results: ``torch.compiler.save_cache_artifacts``) and load it into a fresh process's
caches (``load_cache_artifacts``), after which compiling the same graphs is a cache hit.

Bundles live in ``train.compile_cache`` (default ``<run folder>/compile_cache``, local or ``s3://``), one
sub-folder per torch version and device kind, as ``.bin`` files: each process that compiled something the
loaded bundles lacked writes one, and every bundle is loaded at start. Loading is safe
whatever the bundles hold: PyTorch keys every entry by the graph, its inputs and the compiler's config,
and an entry that does not match is never used. A bundle that cannot be read is reported and skipped;
the run then compiles as if it were absent.
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from deo.io import storage

log = logging.getLogger(__name__)


def device_tag(device: torch.device) -> str:
    """``torch-<version>-<device kind>``, safe as a folder name (bundles only help an identical setup)."""
    kind = "cpu"
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        kind = f"{torch.cuda.get_device_name(device)}-sm{major}{minor}"
    return re.sub(r"[^A-Za-z0-9._-]+", "_", f"torch-{torch.__version__}-{kind}")


@dataclass
class CompileCache:
    """The bundles of one run (``folder``: ``.../compile_cache/<device_tag>``).

    Attributes:
        folder: where this setup's bundles are.
        loaded: bundle URIs loaded by :meth:`load`.
        skipped: ``(uri, reason)`` of bundles that could not be loaded.
        saved: the URI of this process's bundle, once :meth:`save` wrote it.
    """

    folder: str
    loaded: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    saved: str | None = None
    _known: set[tuple[str, str]] = field(default_factory=set, repr=False)

    @classmethod
    def for_run(cls, setting: str, run_uri: str, device: torch.device) -> CompileCache:
        """The cache of ``train.compile_cache`` = ``setting`` ("" = inside the run folder ``run_uri``)."""
        root = setting or storage.join(run_uri, "compile_cache")
        return cls(storage.join(root, device_tag(device)))

    def bundles(self) -> list[str]:
        """This setup's bundle URIs, oldest first."""
        return storage.list_files(self.folder, ".bin")

    def load(self) -> float:
        """Load every bundle into this process's compile caches; returns the seconds spent."""
        t0 = time.perf_counter()
        for uri in self.bundles():
            try:
                info = torch.compiler.load_cache_artifacts(storage.read_bytes(uri))
                if info is None:
                    raise ValueError("not a torch.compiler cache bundle")
            except Exception as e:  # a damaged bundle only costs the compile it would have saved
                self.skipped.append((uri, f"{type(e).__name__}: {e}"))
                log.warning("compile cache: skipping %s (%s: %s); compiling instead", uri, type(e).__name__, e)
                continue
            self._known |= _keys(info)
            self.loaded.append(uri)
        return time.perf_counter() - t0

    def save(self) -> str | None:
        """Write this process's bundle if it compiled anything the loaded bundles did not hold.

        PyTorch's serialisation is cumulative within a process, so a process keeps one bundle and
        rewrites it when it has compiled more. Returns its URI, or None when nothing new was compiled
        (cache hits on loaded code are not new).
        """
        artifacts = torch.compiler.save_cache_artifacts()
        if artifacts is None:
            return None
        data, info = artifacts
        keys = _keys(info)
        if keys <= self._known:
            return None
        if self.saved is None:
            self.saved = storage.join(self.folder, f"{time.time_ns()}-{os.getpid()}.bin")
        storage.write_bytes(self.saved, data)
        self._known |= keys
        return self.saved


def _keys(info: Any) -> set[tuple[str, str]]:
    """(artifact type, key) of everything a ``torch.compiler`` CacheInfo lists."""
    return {(kind, key) for kind, keys in info.artifacts.items() for key in keys}
