"""The start-up line: each phase's seconds in order, summing to the whole."""

import re
import time

from pipeline.train import startup
from pipeline.train.startup import Startup


def test_the_line_gives_each_phase_in_order_and_their_sum():
    clock = Startup(started=100.0, marks=[("imports", 104.0), ("ray", 106.5), ("first step", 110.0)])
    assert clock.line() == "start-up 10.0 s: imports 4.0 | ray 2.5 | first step 3.5"


def test_the_first_job_of_a_process_counts_its_imports_and_a_later_one_starts_now(monkeypatch):
    monkeypatch.setattr(startup, "_JOB", Startup())  # as in a fresh process, whatever ran here before
    first = startup.begin()
    assert first.marks[0][0] == "imports" and first.started < first.marks[0][1]
    startup.mark("storage")
    assert [phase for phase, _ in startup.current().marks] == ["imports", "storage"]
    before = time.time()
    later = startup.begin()
    assert later.started >= before and later.marks == []
    assert re.fullmatch(r"start-up 0\.0 s: ", later.line())
