"""ShardLoader refuses a lane one row short of num_batches x batch_size (it would end in a short batch)."""

from __future__ import annotations

import numpy as np
import pytest

from deo.data.loader import ShardLoader


def test_a_lane_one_row_short_is_refused():
    with pytest.raises(ValueError, match="fewer than 2 x 4"):
        ShardLoader(None, np.zeros((7, 3), np.int64), batch_size=4, num_batches=2)  # type: ignore[arg-type]
    ShardLoader(None, np.zeros((8, 3), np.int64), batch_size=4, num_batches=2)  # type: ignore[arg-type]
