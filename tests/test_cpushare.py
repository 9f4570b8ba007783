"""cpushare.py: the cores other processes keep busy, and the threads they leave; runtime's batch
commands following it between batches."""

import subprocess
import sys
import time

import pytest
import torch

from fairseq_s2s_attn import cpushare, runtime
from fairseq_s2s_attn.cpushare import CoreShare, busy_seconds, children_seconds, threads_left

STAT = """cpu  900 0 300 5000 40 0 7 3 0 0
cpu0 100 5 30 2000 10 2 3 1 50 0
cpu1 200 0 70 1000 20 0 4 2 0 0
cpu2 300 0 90 500 5 0 0 0 0 0
intr 12345
"""


def test_busy_seconds_of_the_cores_asked_for(tmp_path):
    """user, nice, system, irq, softirq and steal count; idle, iowait and guest (counted in user
    already) do not; a core /proc/stat lacks, or no file, is None."""
    stat = tmp_path / "stat"
    stat.write_text(STAT)
    ticks = cpushare.CLOCK_TICKS
    assert busy_seconds([0], str(stat)) == pytest.approx((100 + 5 + 30 + 2 + 3 + 1) / ticks)
    assert busy_seconds([0, 2], str(stat)) == pytest.approx((141 + 390) / ticks)
    assert busy_seconds([3], str(stat)) is None
    assert busy_seconds([0], str(tmp_path / "none")) is None


def test_threads_left_by_the_others():
    """Half a core's worth of other work or more costs a thread; never below 1 or above the
    idle machine's number."""
    assert [threads_left(2, 2, o) for o in (0.0, 0.4, 0.6, 1.0, 1.6, 2.0)] == [2, 2, 1, 1, 1, 1]
    assert [threads_left(8, 4, o) for o in (0.0, 3.0, 4.4, 5.0, 7.5)] == [4, 4, 4, 3, 1]
    assert threads_left(1, 1, 0.0) == 1


def test_the_others_are_the_busy_time_less_this_process(monkeypatch):
    """(busy seconds of the cores - CPU seconds of this process and its children) per second."""
    readings = iter([(10.0, 100.0, 5.0), (12.0, 103.0, 6.0), (13.0, 104.0, 7.5), (14.0, None, 8)])
    monkeypatch.setattr(CoreShare, "reading", lambda self: next(readings))
    share = CoreShare([0, 1])
    assert share.others() == pytest.approx(1.0)  # 3 busy - 1 own over 2 s
    assert share.others() == 0.0  # never below 0 (ticks of 10 ms against a finer clock)
    assert share.others() is None


def test_a_reading_counts_the_children_as_this_process(monkeypatch):
    """A reading's own time is this process's CPU time plus its children's (data loader
    workers), so their work is not taken for other processes'."""
    monkeypatch.setattr(cpushare, "busy_seconds", lambda cpus: 50.0)
    monkeypatch.setattr(cpushare, "children_seconds", lambda: 3.0)
    monkeypatch.setattr(cpushare.time, "process_time", lambda: 2.0)
    assert CoreShare([0, 1]).reading()[1:] == (50.0, 5.0)


def burn(seconds: float) -> str:
    return f"import time\nt = time.process_time()\nwhile time.process_time() - t < {seconds}: pass\n"


def test_children_count_as_this_process():
    """A data loader worker's CPU time is this process's, not the others'."""
    before = children_seconds()
    child = subprocess.Popen([sys.executable, "-c", burn(0.4) + "time.sleep(30)"])
    try:
        deadline = time.monotonic() + 20
        while children_seconds() - before < 0.35 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert children_seconds() - before >= 0.35
    finally:
        child.kill()
        child.wait()


@pytest.mark.skipif(busy_seconds([0]) is None, reason="no /proc/stat")
def test_another_process_busy_is_seen():
    """A busy process that is not this one's child shows as about one core of others' work."""
    share = CoreShare([0])
    script = ("import os, time\nos.sched_setaffinity(0, {0})\nt = time.monotonic()\n"
              "while time.monotonic() - t < 3: pass\n")
    # sh starts it and exits: the busy process is no child of this one
    subprocess.run(["sh", "-c", f'{sys.executable} -c "{script}" &'], check=True)
    time.sleep(0.5)
    share.others()
    time.sleep(1.5)
    assert share.others() >= 0.5


@pytest.fixture
def following(monkeypatch):
    """The plugin's thread following installed with a made-up load, readings at every batch;
    torch's threads restored after."""
    saved = torch.get_num_threads()
    load = {"others": 0.0}
    monkeypatch.setattr(runtime, "FOLLOW_PERIOD_S", 0.0)
    assert runtime.threads_follow_other_work(2)
    monkeypatch.setattr(runtime._FOLLOW["share"], "others", lambda: load["others"])
    monkeypatch.setattr(runtime._FOLLOW["share"], "cpus", [0, 1])
    yield load
    runtime._FOLLOW.clear()
    torch.set_num_threads(saved)


def test_batch_threads_give_way_to_other_work_and_come_back(following):
    """fairseq's iterators hand over each batch through CountingIterator.__next__: there the
    threads follow the other processes' load, down to the cores they leave and back up."""
    from fairseq.data.iterators import CountingIterator

    torch.set_num_threads(2)
    batches = CountingIterator(range(6))
    seen = []
    for load in (0.0, 1.0, 1.0, 0.2, 1.9, 0.0):
        following["others"] = load
        next(batches)
        seen.append(torch.get_num_threads())
    assert seen == [2, 1, 1, 2, 1, 2]


def test_the_users_threads_are_left_alone(monkeypatch, following):
    """S2S_NUM_THREADS (or OMP_NUM_THREADS) fixes the number: nothing follows the load then."""
    from fairseq.data.iterators import CountingIterator

    monkeypatch.setenv("S2S_NUM_THREADS", "2")
    runtime.set_thread_defaults(batches=True)
    following["others"] = 2.0
    for _ in CountingIterator(range(3)):
        assert torch.get_num_threads() == 2
    assert not runtime._FOLLOW
