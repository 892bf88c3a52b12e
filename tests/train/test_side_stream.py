"""deo/train/side_stream.py: the order of waits on a fork and a join, with recording stand-ins for CUDA streams."""

import contextlib

import pytest
import torch

from deo.train.side_stream import SideStream


class _Stream:
    def __init__(self, name, log):
        self.name, self.log, self.device = name, log, torch.device("cuda", 0)

    def wait_stream(self, other):
        self.log.append(f"{self.name} waits for {other.name}")


@pytest.fixture
def log(monkeypatch):
    log = []
    main = _Stream("main", log)
    monkeypatch.setattr(torch.cuda, "Stream", lambda device: _Stream("side", log))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: main)

    @contextlib.contextmanager
    def on(stream):
        log.append(f"on {stream.name}")
        yield
        log.append(f"off {stream.name}")

    monkeypatch.setattr(torch.cuda, "stream", on)
    return log


def test_fork_waits_for_the_current_stream_and_join_waits_for_the_side_stream(log):
    side = SideStream("cuda", enabled=True)
    assert side.fork(lambda x: log.append("teachers") or x + 1, 1) == 2
    log.append("student")
    side.join()
    side.join()  # a second join waits for nothing more
    assert log == ["side waits for main", "on side", "teachers", "off side", "student", "main waits for side"]
    assert SideStream("cuda", enabled=False).stream is None and SideStream("cpu", enabled=True).stream is None


def test_a_failing_fork_is_joined_and_a_fork_needs_a_join(log):
    side = SideStream("cuda", enabled=True)

    def fail():
        raise KeyError("teacher")

    with pytest.raises(KeyError):
        side.fork(fail)
    assert log[-1] == "main waits for side" and not side.forked
    side.fork(lambda: None)  # usable again
    with pytest.raises(RuntimeError, match="twice without a join"):
        side.fork(lambda: None)
