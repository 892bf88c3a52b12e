"""The ingest run: discover -> probe (scenes -> windows) -> jobs (windows -> tiles -> shards) -> manifest.

The same three steps run on Ray Data (:mod:`deo.ingest.ray_data`) or in a plain loop
(:func:`ingest` with ``use_ray=False``); both call the functions here, so they write identical shards.

Shard files are named by a hash of their content plan (the windows they hold and the content-relevant
config), so a rerun writes the same files with the same sample_ids; jobs whose files are already
complete are skipped (an interrupted run resumes) and files from other plans are removed.

Failures partway: the rows of a window are written all or none. When a window of a scene fails,
the scene's windows already read stay in the shards (a shard file is written once, never edited) and
the manifest says so: status ``partial`` with the reason and ``tiles`` = exactly the scene's rows in
the shards; ``failed`` means no row of it was written.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import resource
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict
from typing import Any

import pyarrow.parquet as pq

import deo
from deo.bands import DEO_BANDS, RGB_BANDS, SAR_BANDS, band_order_warning
from deo.cluster import warn_if_job_scratch
from deo.config import to_dict
from deo.ingest.config import IngestConfig
from deo.ingest.discover import Skipped, Source, discover_aerial, discover_s2, discover_sar
from deo.ingest.scene import (
    SourceError,
    pair_candidates,
    probe_aerial,
    probe_s2,
    probe_sar,
    sar_candidates,
)
from deo.ingest.stats import BandStats
from deo.ingest.tiling import TileMaker, WindowReadError, windows_of
from deo.io import storage
from deo.io.raster import RasterCache
from deo.io.shards import MANIFEST, SCHEMA_VERSION, rows_to_table, shard_schema

PARTS = "_parts"
"""Folder (inside the output) of per-job summaries; a job is complete when its summary exists."""

_RUNTIME_KEYS = ("output", "use_ray", "strict", "summary", "ray_resources")


def content_hash(cfg: IngestConfig) -> str:
    """Hash of the config keys that change shard content (not where or how the run executes)."""
    d = {k: v for k, v in to_dict(cfg).items() if k not in _RUNTIME_KEYS}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def config_hash(cfg: IngestConfig) -> str:
    """Hash of the whole resolved config (recorded in the manifest)."""
    return hashlib.sha256(json.dumps(to_dict(cfg), sort_keys=True, default=str).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------ discovery
def discover(cfg: IngestConfig) -> tuple[list[Source], list[Skipped]]:
    """All S2 scenes, aerial images and S1 pairs named by the config, and inputs skipped or missing."""
    scenes, skipped = discover_s2(list(cfg.s2))
    aerial, skipped_a = discover_aerial(list(cfg.aerial))
    sar, skipped_s = discover_sar(list(cfg.sar))
    return scenes + aerial + sar, skipped + skipped_a + skipped_s


def probe(source: dict[str, Any], cfg: IngestConfig, cache: RasterCache) -> dict[str, Any]:
    """Plan one source (a :class:`Source` as dict); failures come back as ``{"error": reason}``."""
    src = Source(**source)
    try:
        if src.kind == "aerial":
            return probe_aerial(src, cfg, cache)
        if src.kind == "s1_pair":
            return probe_sar(src, cfg, cache)
        return probe_s2(src, cfg, cache)
    except (SourceError, ValueError, OSError) as e:
        if isinstance(e, storage.StorageAccessError) and e.kind != "denied":
            raise  # no credentials or no endpoint: every source would fail the same way
        return {"kind": src.kind, "uri": src.uri, "key": src.key, "files": src.files, "error": str(e)}


# ------------------------------------------------------------------------------------ jobs
def plan_jobs(plans: list[dict[str, Any]], cfg: IngestConfig) -> list[dict[str, Any]]:
    """Pack the windows of all planned sources into jobs of at most ``rows_per_file`` tiles.

    A source with at least ``rows_per_file`` tiles (a Sentinel-2 scene) is split on its own into the
    fewest jobs that hold it, as even as whole windows allow (:func:`_even_groups`): the jobs of a scene,
    which Ray runs in parallel, then take about the same time, where filling each file first left one
    small last job and a worker idle at the end of a one-scene ingest. Smaller sources (patches, aerial
    images) fill shared jobs one after another. A scene's jobs depend only on that scene, so adding or
    losing a source leaves every other scene's jobs (and finished files) as they were; shared jobs are
    repacked from the first changed small source on. A window with more than ``rows_per_file`` tiles is
    a job of its own.

    Each job becomes one shard file named ``part-<hash>.parquet`` after its windows and the content
    config, so the same inputs and config always give the same files.
    """
    sars = [p for p in plans if "error" not in p and p["kind"] == "s1_pair"]
    good = [p for p in plans if "error" not in p and p["kind"] != "s1_pair"]
    aerials = [p for p in good if p["kind"] == "aerial"]
    wt, limit = cfg.tile.window_tiles, cfg.rows_per_file
    chash = content_hash(cfg)
    jobs: list[dict[str, Any]] = []

    def add_jobs(entries: list[tuple[dict[str, Any], list, list, tuple[int, int]]], sizes: list[int]) -> None:
        """One job per group of ``sizes`` consecutive (plan, pairs, sars, window) entries."""
        start = 0
        for size in sizes:
            units: list[dict[str, Any]] = []
            for p, pairs, sar, window in entries[start : start + size]:
                if not units or units[-1]["plan"] is not p:
                    units.append({"plan": p, "windows": [], "pairs": pairs, "sars": sar})
                units[-1]["windows"].append(window)
            start += size
            ident = json.dumps([[u["plan"]["key"], u["windows"]] for u in units]) + chash
            jobs.append({"name": "part-" + hashlib.sha1(ident.encode()).hexdigest()[:16], "units": units})

    small: list[tuple[dict[str, Any], list, list, tuple[int, int]]] = []  # sources below the limit, in order
    small_tiles: list[int] = []
    for p in good:
        pairs = pair_candidates(p, aerials) if (cfg.pair and p["kind"] != "aerial") else []
        sar = sar_candidates(p, sars) if p["kind"] != "aerial" else []
        windows = windows_of(p, wt)
        entries = [(p, pairs, sar, w) for w in windows]
        tiles = [min(wt, p["tiles_x"] - wx * wt) * min(wt, p["tiles_y"] - wy * wt) for wx, wy in windows]
        if sum(tiles) >= limit:
            add_jobs(entries, _even_groups(tiles, limit))
        else:
            small += entries
            small_tiles += tiles
    add_jobs(small, _fill(small_tiles, limit))
    return jobs


def _fill(tiles: list[int], cap: int) -> list[int]:
    """Group sizes of consecutive windows filled in order up to ``cap`` tiles (a larger window alone)."""
    sizes: list[int] = []
    total = 0
    for n in tiles:
        if not sizes or total + n > cap:
            sizes.append(0)
            total = 0
        sizes[-1] += 1
        total += n
    return sizes


def _even_groups(tiles: list[int], limit: int) -> list[int]:
    """Split consecutive windows of ``tiles`` tiles each into the fewest groups of at most ``limit``
    tiles (a larger window alone), with the largest group as small as that allows; returns group sizes.

    Filling in order up to ``limit`` gives the fewest groups. The smallest cap that still gives that
    many (found by bisection: fewer tiles per group never means fewer groups) evens them out.
    """
    fewest = len(_fill(tiles, limit))
    lo, hi = 1, limit
    while lo < hi:
        mid = (lo + hi) // 2
        if len(_fill(tiles, mid)) <= fewest:
            hi = mid
        else:
            lo = mid + 1
    return _fill(tiles, lo)


STATS_VERSION = 2
"""What a job summary's statistics count; jobs summarised under another version are done again. 2: the
optical stats count what training reads (MS rows, with the S2 true colour where they have no optical)."""


def _job_done(output: str, name: str) -> dict[str, Any] | None:
    """The summary of a job an earlier run completed, or None to (re)do it.

    A job in which a source failed to read is done again: the failure may have been transient, or the
    file has been fixed since. So is one whose statistics an older version counted otherwise.
    """
    path = storage.join(output, PARTS, name + ".json")
    if not storage.exists(path):
        return None
    summary = json.loads(storage.read_text(path))
    if summary["rows"] and not storage.exists(storage.join(output, name + ".parquet")):
        return None
    if any(rec.get("error") for rec in summary["sources"].values()):
        return None
    if summary.get("stats_version") != STATS_VERSION:
        return None
    return summary


def run_job(job: dict[str, Any], cfg: IngestConfig, cache: RasterCache) -> dict[str, Any]:
    """Read every window of a job, write its shard file, and return the job summary.

    Windows are read and written one at a time (bounded memory). A source whose window fails is
    recorded with the reason (its rows of earlier windows stay, counted in ``tiles``) and its
    remaining windows in this job are skipped; other sources go on.
    """
    output = cfg.output.rstrip("/")
    done = _job_done(output, job["name"])
    if done is not None:
        done["resumed"] = True
        return done
    start = time.perf_counter()
    maker = TileMaker(cfg, cache)
    schema = shard_schema(cfg.tile.ms_px, cfg.tile.optical_px, sar=bool(cfg.sar))
    sources: dict[str, dict[str, Any]] = {}
    sar_tiles: dict[str, int] = {}
    counts = {"rows": 0, "ms": 0, "optical": 0, "paired": 0, "sar": 0, "rejected_nodata": 0,
              "rejected_cloud": 0}
    tmp = tempfile.NamedTemporaryFile(suffix=".parquet", delete=False)
    tmp.close()
    writer: pq.ParquetWriter | None = None
    try:
        for unit in job["units"]:
            plan = unit["plan"]
            rec = sources.setdefault(plan["key"], {"uri": plan["uri"], "tiles": 0, "rejected": 0,
                                                   "error": None})
            for wx, wy in unit["windows"]:
                if rec["error"]:
                    break
                try:
                    rows, rejects = maker.window_rows(plan, wx, wy, unit["pairs"], unit.get("sars"))
                except Exception as e:  # noqa: BLE001 - any read failure is recorded, the run goes on
                    detail = str(e) if isinstance(e, WindowReadError) else f"{type(e).__name__}: {e}"
                    rec["error"] = f"read failed at window ({wx}, {wy}): {detail}"
                    continue
                rec["tiles"] += len(rows)
                rec["rejected"] += rejects["nodata"] + rejects["cloud"]
                counts["rejected_nodata"] += rejects["nodata"]
                counts["rejected_cloud"] += rejects["cloud"]
                if not rows:
                    continue
                for r in rows:
                    counts["rows"] += 1
                    counts["ms"] += r["ms"] is not None
                    counts["optical"] += r["optical"] is not None
                    counts["paired"] += (r["ms"] is not None and r["source_optical"] is not None
                                         and r["source_optical"] != r["source_ms"])
                    if r.get("sar") is not None:
                        counts["sar"] += 1
                        sar_tiles[r["_sar_key"]] = sar_tiles.get(r["_sar_key"], 0) + 1
                if writer is None:
                    writer = pq.ParquetWriter(tmp.name, schema, compression="zstd")
                writer.write_table(rows_to_table(rows, schema))
        if writer is not None:
            writer.close()
            writer = None
            _put(tmp.name, storage.join(output, job["name"] + ".parquet"))
    finally:
        if writer is not None:
            writer.close()
        os.unlink(tmp.name)
        maker.close()
    summary = {
        "name": job["name"],
        **counts,
        "sources": sources,
        "sar_tiles": sar_tiles,
        "ms_stats": maker.ms_stats.to_state(),
        "optical_stats": maker.optical_stats.to_state(),
        "sar_stats": maker.sar_stats.to_state(),
        "stats_version": STATS_VERSION,
        "seconds": time.perf_counter() - start,
        "resumed": False,
        # peak RSS of the process that ran the job (a Ray worker or the plain loop), for the benchmark
        "worker_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "pid": os.getpid(),
    }
    storage.write_text(storage.join(output, PARTS, job["name"] + ".json"), json.dumps(summary))
    return summary


def _put(local: str, uri: str) -> None:
    fs, path = storage.filesystem(uri)
    if storage.is_remote(storage.strip_file_scheme(uri)):
        fs.put(local, path)
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(local, "rb") as fi, open(tmp, "wb") as fo:
        while chunk := fi.read(1 << 22):
            fo.write(chunk)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------ manifest
def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_clean(x) for x in v]
    return v


def build_manifest(cfg: IngestConfig, plans: list[dict[str, Any]], skipped: list[Skipped],
                   summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """The manifest.json contents (DESIGN.md shard contract)."""
    ms, opt, sar = BandStats(len(DEO_BANDS)), BandStats(3), BandStats(len(SAR_BANDS))
    counts = {"rows": 0, "ms": 0, "optical": 0, "paired": 0, "sar": 0, "rejected": 0, "rejected_nodata": 0,
              "rejected_cloud": 0}
    per_source: dict[str, dict[str, Any]] = {}
    sar_tiles: dict[str, int] = {}
    files: list[str] = []
    for s in summaries:
        ms.merge(BandStats.from_state(s["ms_stats"]))
        opt.merge(BandStats.from_state(s["optical_stats"]))
        sar.merge(BandStats.from_state(s["sar_stats"]))
        for k in ("rows", "ms", "optical", "paired", "sar", "rejected_nodata", "rejected_cloud"):
            counts[k] += s[k]
        for key, n in s["sar_tiles"].items():
            sar_tiles[key] = sar_tiles.get(key, 0) + n
        if s["rows"]:
            files.append(s["name"] + ".parquet")
        for key, rec in s["sources"].items():
            agg = per_source.setdefault(key, {"tiles": 0, "rejected": 0, "error": None})
            agg["tiles"] += rec["tiles"]
            agg["rejected"] += rec["rejected"]
            agg["error"] = agg["error"] or rec["error"]
    counts["rejected"] = counts["rejected_nodata"] + counts["rejected_cloud"]
    sources: list[dict[str, Any]] = []
    for p in plans:
        entry: dict[str, Any] = {"uri": p["uri"], "kind": p["kind"], "files": sorted(p["files"].values())}
        agg = per_source.get(p["key"], {"tiles": 0, "rejected": 0, "error": None})
        if "error" in p:
            entry.update(status="failed", reason=p["error"], tiles=0)
        elif p["kind"] == "s1_pair":
            n = sar_tiles.get(p["key"], 0)
            if n:
                entry.update(status="ok", reason="", tiles=n)
            else:
                entry.update(status="skipped", tiles=0, reason=(
                    f"covers no ingested MS tile: footprint {tuple(round(v, 1) for v in p['bounds'])} in "
                    f"{_crs_name(p['grid']['crs'])} wholly contains no accepted MS tile"))
        elif agg["error"] and agg["tiles"]:
            entry.update(status="partial", tiles=agg["tiles"], reason=(
                f"{agg['error']}; the {agg['tiles']} tiles of its windows read before the failure are in "
                "the shards, its later windows are not"))
        elif agg["error"]:
            entry.update(status="failed", reason=agg["error"], tiles=0)
        elif p["tiles_x"] * p["tiles_y"] == 0:
            w, h = p["grid"]["width"], p["grid"]["height"]
            entry.update(status="skipped", reason=f"smaller than one tile: {w}x{h} px < {p['tile_px']} px",
                         tiles=0)
        else:
            entry.update(status="ok", reason="", tiles=agg["tiles"])
        entry["rejected"] = agg["rejected"]
        if p["kind"] not in ("aerial", "s1_pair") and "error" not in p:
            entry.update(level=p["level"], offset=p["offset"], offset_from=p["offset_from"],
                         gsd=p["gsd"], time=p["time"])
        sources.append(entry)
    for s in skipped:
        sources.append({"uri": s.uri, "kind": "input", "files": [s.uri], "status": s.status,
                        "reason": s.reason, "tiles": 0, "rejected": 0})
    bands = {"ms": list(DEO_BANDS), "optical": list(RGB_BANDS)}
    # the stretch travels with the optical stats (checkpoints and exports carry them), so training's
    # fill-in and evaluation make the S2 true colour as ingest did
    stats = {"ms": ms.mean_std(), "optical": {**opt.mean_std(), "s2_true_colour_max": cfg.s2_optical_max}}
    if cfg.sar:  # the shards have a `sar` column (VV, VH in dB; stats over its pixels, all valid)
        bands["sar"] = list(SAR_BANDS)
        stats["sar"] = sar.mean_std()
    return _clean({
        "schema_version": SCHEMA_VERSION,
        "bands": bands,
        "tile": {"ms_px": cfg.tile.ms_px, "optical_px": cfg.tile.optical_px},
        "counts": counts,
        "stats": stats,
        "sources": sources,
        "files": sorted(files),
        "config": to_dict(cfg),
        "config_hash": config_hash(cfg),
        "content_hash": content_hash(cfg),
        "package_version": deo.__version__,
    })


def _crs_name(wkt: str) -> str:
    from rasterio.crs import CRS

    return CRS.from_wkt(wkt).to_string()


def remove_stale(output: str, jobs: list[dict[str, Any]]) -> int:
    """Delete shard files and job summaries of other plans (a rerun leaves exactly this plan's files).

    Only the output folder's own files: datasets ingested into its sub-folders are not this run's.
    """
    keep = {j["name"] for j in jobs}
    removed = 0
    for uri in (storage.list_files(output, ".parquet", recursive=False)
                + storage.list_files(storage.join(output, PARTS), ".json", recursive=False)):
        name = uri.rsplit("/", 1)[-1].rsplit(".", 1)[0]
        if name.startswith("part-") and name not in keep:
            storage.remove(uri)
            removed += 1
    return removed


# ------------------------------------------------------------------------------------ driver
def plain_runner(jobs: list[dict[str, Any]], cfg: IngestConfig) -> Iterator[dict[str, Any]]:
    """Run jobs one after another in this process (the benchmark's baseline and ``use_ray=false``)."""
    cache = RasterCache()
    try:
        for job in jobs:
            yield run_job(job, cfg, cache)
    finally:
        cache.close()


def plain_probe(sources: list[dict[str, Any]], cfg: IngestConfig) -> list[dict[str, Any]]:
    """Probe sources in this process."""
    cache = RasterCache()
    try:
        return [probe(s, cfg, cache) for s in sources]
    finally:
        cache.close()


def ingest(cfg: IngestConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run a whole ingest and write shards, manifest.json and the summary JSON.

    Args:
        cfg: resolved config.
        log: where progress lines go.

    Returns:
        The summary (counts, rejects, failed sources, tiles/s, paths).
    """
    start = time.perf_counter()
    output = cfg.output.rstrip("/")
    warn_if_job_scratch("output", output)
    sources, skipped = discover(cfg)  # on the driver: nothing found (a mistyped path) needs no Ray
    if cfg.use_ray and sources:
        from deo.ingest import ray_data

        ray_data.prepare(cfg)  # fails here, before any work, when no node can run the ingest tasks
    log(f"[ingest] {len(sources)} sources ({sum(s.kind.startswith('s2') for s in sources)} S2 scenes, "
        f"{sum(s.kind == 's1_pair' for s in sources)} S1 pairs), {len(skipped)} inputs skipped or missing")
    source_dicts = [asdict(s) for s in sources]
    if cfg.use_ray:
        from deo.ingest import ray_data

        plans = ray_data.probe_all(source_dicts, cfg)
    else:
        plans = plain_probe(source_dicts, cfg)
    jobs = plan_jobs(plans, cfg)
    planned = sum(len(u["windows"]) for j in jobs for u in j["units"])
    log(f"[ingest] {len(plans) - sum('error' in p for p in plans)} sources readable, {len(jobs)} shard "
        f"files, {planned} windows")
    removed = remove_stale(output, jobs)
    if removed:
        log(f"[ingest] removed {removed} files of an earlier plan")
    results: Iterable[dict[str, Any]]
    if cfg.use_ray:
        from deo.ingest import ray_data

        results = ray_data.run_jobs(jobs, cfg)
    else:
        results = plain_runner(jobs, cfg)
    summaries: list[dict[str, Any]] = []
    tiles = 0
    for s in results:
        summaries.append(s)
        tiles += s["rows"]
        rate = tiles / max(time.perf_counter() - start, 1e-9)
        log(f"[ingest] shard {len(summaries)}/{len(jobs)} {s['name']}: {s['rows']} tiles"
            f"{' (already done)' if s.get('resumed') else ''}; total {tiles} tiles, {rate:.1f} tiles/s")
    summaries.sort(key=lambda s: s["name"])
    manifest = build_manifest(cfg, plans, skipped, summaries)
    storage.write_text(storage.join(output, MANIFEST), json.dumps(manifest, indent=1))
    seconds = time.perf_counter() - start
    failed = [s for s in manifest["sources"] if s["status"] in ("failed", "partial")]
    summary = {
        "output": output,
        "manifest": storage.join(output, MANIFEST),
        "mode": "ray" if cfg.use_ray else "plain",
        "counts": manifest["counts"],
        "sources": {st: sum(s["status"] == st for s in manifest["sources"])
                    for st in ("ok", "partial", "failed", "skipped")},
        "failed": [{"uri": s["uri"], "reason": s["reason"]} for s in failed],
        "files": len(manifest["files"]),
        "seconds": round(seconds, 3),
        "tiles_per_s": round(manifest["counts"]["rows"] / max(seconds, 1e-9), 2),
        "config_hash": manifest["config_hash"],
        # custom resources Ray assigned to the shard tasks (Ray mode): shows which pool ran them
        "task_resources": {k: v for s in summaries for k, v in (s.get("task_resources") or {}).items()
                           if k not in ("CPU", "GPU", "memory")},
    }
    order = f"s2_band_order={','.join(cfg.s2_band_order)}" if cfg.s2_band_order else "the files' band descriptions"
    warning = band_order_warning(manifest["stats"]["ms"]["mean"], order)
    if warning:
        log(f"[ingest] warning: {warning}")
    summary["warnings"] = [warning] if warning else []
    storage.write_text(cfg.summary or storage.join(output, "summary.json"), json.dumps(summary, indent=1))
    return summary


def failure_lines(failed: list[dict[str, str]], shown: int = 3) -> list[str]:
    """What to print of the summary's ``failed`` sources: each, but at most ``shown`` per kind of failure
    (the reason with its file taken out) and then how many more (216 EuroSAT stacks ingested without
    ``s2_band_order`` printed one identical line each). The manifest keeps every one."""
    kinds: dict[str, list[dict[str, str]]] = {}
    for f in failed:
        kinds.setdefault(f["reason"].replace(f["uri"], "<file>"), []).append(f)
    lines = []
    for kind, items in kinds.items():
        lines += [f"failed: {f['uri']}: {f['reason']}" for f in items[:shown]]
        if len(items) > shown:
            lines.append(f"failed: {len(items) - shown} more sources alike: {kind}")
    return lines
