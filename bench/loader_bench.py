"""Can the shard loader feed an H100? Samples/s of ``ShardLoader`` on 256 px tiles, batch 64.

The GPU step of the reference config runs at 186-210 samples/s on one H100 (bench/RESULTS.md). This
measures what one training worker's loader thread delivers on this machine, reading real-derived
shards (``bench/ingest_bench.py``'s full-size 29RKH tile, ingested once into ``--workdir``):

- ``once``: the loader as shipped; each row group is decoded once per pass and freed after the
  lane's last row from it; one decode thread, and ``once_2threads`` with two (``train.loader_threads``).
- ``lru8``: the loader before, side by side. It kept the 8 most recently used row groups, so a
  shuffle window wider than 8 row groups (512 rows) decoded a row group again for each batch that
  touched it.

Both run at ``--shuffle`` windows: the CPU default (256 rows) and the reference config's (4096,
capped by the dataset's rows). No CUDA is used, so the rows are not pinned; pinning is measured with
the GPU step.

    python bench/loader_bench.py [--workdir /tmp/deo_ingest_bench] [--shuffle 256,4096] [--out f.json]
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ingest_bench import build_full_tile, run_ingest  # noqa: E402

from deo.data import loader as loader_mod  # noqa: E402
from deo.data.sampling import lane_streams  # noqa: E402
from deo.io.shards import ShardDataset  # noqa: E402

from step_bench import emit  # noqa: E402


class LRU8(loader_mod._RowGroupCache):
    """The loader's cache before: the 8 most recently used row groups."""

    def get(self, f: int, rg: int):  # noqa: ANN201
        hit = (f, rg) in self.cache
        out = super().get(f, rg)
        self.cache[(f, rg)] = self.cache.pop((f, rg))  # most recent last
        if not hit and len(self.cache) > 8:
            self.cache.pop(next(iter(self.cache)))
        return out

    def release(self, f: int, rg: int, position: int) -> None:
        return None


def measure(index: loader_mod.ShardIndex, shuffle: int, batch: int, cache: type, threads: int = 1) -> dict:
    lane = lane_streams(index.units, 0, 0, batch, 1, [], shuffle)[0]
    n = len(lane) // batch
    original = loader_mod._RowGroupCache
    loader_mod._RowGroupCache = cache
    try:
        loader = loader_mod.ShardLoader(index, lane, batch, n, prefetch=4, decode_threads=threads)
        t0 = time.perf_counter()
        rows = sum(len(b["sample_id"]) for b in loader)
        seconds = time.perf_counter() - t0
    finally:
        loader_mod._RowGroupCache = original
    return {"samples_per_s": round(rows / seconds, 1), "seconds": round(seconds, 2), "batches": n,
            "row_groups_decoded": loader.row_groups.decoded,
            "row_groups_in_lane": len({(int(f), int(g)) for f, g, _ in lane[: n * batch]})}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/tmp/deo_ingest_bench")
    ap.add_argument("--shuffle", default="256,4096")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    work = Path(args.workdir)
    shards = work / "out_full_plain"
    if not (shards / "manifest.json").exists():
        run_ingest([build_full_tile(work, 10980)], shards, 256, use_ray=False)
    ds = ShardDataset.open(str(shards))
    index = loader_mod.ShardIndex.build(ds.uri, ds.files)
    report = {"command": "python bench/loader_bench.py " + " ".join(sys.argv[1:]), "rows": index.num_rows,
              "tile": list(index.ms_shape), "batch": args.batch, "runs": {}}
    for shuffle in [int(x) for x in args.shuffle.split(",")]:
        for name, cache, threads in (("once", loader_mod._RowGroupCache, 1),
                                     ("once_2threads", loader_mod._RowGroupCache, 2), ("lru8", LRU8, 1)):
            r = measure(index, shuffle, args.batch, cache, threads)
            report["runs"][f"shuffle{shuffle}_{name}"] = r
            print(shuffle, name, r, flush=True)
    report["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    emit(report, args.out)


if __name__ == "__main__":
    main()
