"""ShardLoader: batches hold exactly the lane's rows, each row group decoded once per pass."""

import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

from deo.data.loader import ShardIndex, ShardLoader, check_shard_files
from deo.data.sampling import lane_streams
from deo.io.shards import ShardDataset, tensor_column_to_numpy


@pytest.mark.parametrize("threads", [1, 3])
def test_a_wide_shuffle_window_decodes_each_row_group_once(sample_shards, tmp_path, threads):
    # the real sample shard rewritten with 8-row groups: ~40 row groups, more than a few-entry cache
    src = ShardDataset.open(str(sample_shards))
    for path in src.files:
        pq.write_table(pq.read_table(path), tmp_path / path.rsplit("/", 1)[-1], row_group_size=8)
    shutil.copy(sample_shards / "manifest.json", tmp_path / "manifest.json")
    ds = ShardDataset.open(str(tmp_path))
    index = ShardIndex.build(ds.uri, ds.files)
    n = index.num_rows
    # one shuffle window over the whole dataset: every batch draws rows from most row groups
    lane = lane_streams(index.units, 0, 0, 8, 1, [], shuffle_buffer=n)[0]
    batches = len(lane) // 8
    loader = ShardLoader(index, lane, 8, batches, decode_threads=threads)
    got = [b for b in loader]
    groups = {(int(f), int(rg)) for f, rg, _ in lane[: batches * 8]}
    assert len(groups) > 16 and loader.row_groups.decoded == len(groups)
    assert loader.row_groups.cache == {}  # everything released after its last row

    # the rows are the lane's, in order
    files = [pq.ParquetFile(p) for p in index.files]
    for b in (0, len(got) // 2, len(got) - 1):
        batch = got[b]
        for i, (f, rg, r) in enumerate(lane[b * 8 : (b + 1) * 8].tolist()):
            table = files[f].read_row_group(rg, columns=["sample_id", "ms"])
            assert batch["sample_id"][i] == table.column("sample_id")[r].as_py()
            ms, _ = tensor_column_to_numpy(table.column("ms"))
            np.testing.assert_array_equal(batch["ms"][i].numpy(), ms[r])


def test_damaged_or_foreign_shards_are_named_before_training(sample_shards, tmp_path):
    """A cut-short shard failed on every worker with pyarrow's 'magic bytes' error, naming no file."""
    files = [str(sample_shards / f) for f in ShardDataset.open(str(sample_shards)).manifest["files"]]
    check_shard_files(files)  # the real shards pass
    cut = tmp_path / "cut.parquet"
    cut.write_bytes((sample_shards / files[0].rsplit("/", 1)[-1]).read_bytes()[:100_000])
    with pytest.raises(ValueError, match=f"shard {cut} is not a readable Parquet file"):
        check_shard_files([*files, str(cut)])
    with pytest.raises(ValueError, match="listed in manifest.json but missing"):
        check_shard_files([str(tmp_path / "gone.parquet")])
    foreign = tmp_path / "no_ms.parquet"
    pq.write_table(pq.read_table(files[0]).drop_columns(["ms"]), foreign)
    with pytest.raises(ValueError, match=f"shard {foreign} has no ms column"):
        check_shard_files([str(foreign)])
    with pytest.raises(ValueError, match=f"shard {files[0]}: .*sar"):
        ShardIndex.build(str(sample_shards), files, with_sar=True)
