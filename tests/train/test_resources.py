"""The resource plan (pipeline/train/resources.py) and the stall watchdog (pipeline/train/watchdog.py) on
their own: the numbers of real clusters, a Hypothesis property, and a real iterator that stops yielding."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.train import resources, watchdog
from pipeline.train.resources import ResourcePlanError, Stage
from pipeline.train.watchdog import DataStall, GroupWatch, Watched

TWO_NODES = [{"CPU": 2.0}, {"CPU": 2.0}]


def stream(decode: dict[str, float], light: float) -> dict[str, list[Stage]]:
    return {"train": [Stage("train: expand", {"CPU": light}), Stage("train: cut", {"CPU": light}),
                      Stage("train: decode", decode)]}


def test_the_issues_starved_plan_is_refused_with_its_numbers_and_runs_with_light_stages():
    worker = {"CPU": 1.5}
    # the stream as it was: its first stages at Ray's default of 1 CPU, which no node has left
    with pytest.raises(ResourcePlanError) as refused:
        resources.check(TWO_NODES, worker, 2, 2, stream({"CPU": 0.5}, light=1.0))
    message = str(refused.value)
    assert "2 training worker(s) of {CPU 1.5}" in message and "node 0: CPU 0.5; node 1: CPU 0.5" in message
    assert "train: expand needs {CPU 1} per task" in message and "Ray Data's budget: CPU 1" in message
    assert "scaling.cpus_per_worker" in message and "data.decode_num_cpus" in message
    # light stages of 0.25 and decode tasks of 0.5 fit, all at once
    assert resources.check(TWO_NODES, worker, 2, 2, stream({"CPU": 0.5}, light=0.25)) == []


def test_one_node_left_runs_the_stages_in_turns_with_a_warning():
    warnings = resources.check([{"CPU": 2.0}], {"CPU": 1.5}, 1, 2, stream({"CPU": 0.5}, light=0.25))
    assert len(warnings) == 1 and "take turns" in warnings[0]


def test_workers_that_fill_the_cluster_or_do_not_fit_it_are_refused():
    with pytest.raises(ResourcePlanError, match="needs {CPU 1} per task"):
        resources.check(TWO_NODES, {"CPU": 1.0}, 4, 4, stream({"CPU": 1.0}, light=0.25))
    with pytest.raises(ResourcePlanError, match=r"3 training worker\(s\) of \{CPU 1.5\} do not fit"):
        resources.check(TWO_NODES, {"CPU": 1.5}, 3, 3, stream({"CPU": 0.5}, light=0.25))


def test_an_elastic_group_is_checked_at_the_size_it_starts_with():
    # [2, 4] workers of 1 CPU start as 4 on two 2-CPU nodes and leave nothing: refused, though 2 would fit
    with pytest.raises(ResourcePlanError, match=r"4 training worker\(s\)"):
        resources.check(TWO_NODES, {"CPU": 1.0}, 2, 4, stream({"CPU": 0.5}, light=0.25))
    assert resources.workers_started(TWO_NODES, {"CPU": 1.0}, 2, 3) == 3


def test_decode_tasks_pinned_to_a_custom_resource_need_a_node_that_has_it():
    pinned = stream({"CPU": 1.0, "decode": 1.0}, light=0.25)
    with pytest.raises(ResourcePlanError, match="decode 1"):
        resources.check(TWO_NODES, {"CPU": 1.0}, 2, 2, pinned)
    gpu_node = {"CPU": 96.0, "GPU": 8.0}
    decode_node = {"CPU": 4.0, "decode": 4.0}
    assert resources.check([gpu_node, decode_node], {"CPU": 11.0, "GPU": 1.0}, 8, 8, pinned) == []


def test_the_worked_example_of_a_gpu_node_in_docs_cluster_md():
    node = [{"CPU": 96.0, "GPU": 8.0}]
    plan = stream({"CPU": 1.0}, light=0.25)
    assert resources.check(node, {"CPU": 4.0, "GPU": 1.0}, 8, 8, plan) == []
    left = resources.place_workers(node, {"CPU": 4.0, "GPU": 1.0}, 8)
    assert left == [{"CPU": 64.0, "GPU": 0.0}]  # 63 decode tasks beside the two light ones
    with pytest.raises(ResourcePlanError, match="clips_of_rows|decode"):
        resources.check(node, {"CPU": 12.0, "GPU": 1.0}, 8, 8, plan)


NODE = st.fixed_dictionaries({"CPU": st.sampled_from([0.5, 1.0, 2.0, 4.0, 8.0])})


@settings(max_examples=300, deadline=None)
@given(nodes=st.lists(NODE, min_size=1, max_size=5), extra=NODE,
       workers=st.integers(1, 6), cpus=st.sampled_from([0.25, 0.5, 1.0, 1.5, 2.0]),
       decode=st.sampled_from([0.25, 0.5, 1.0]), light=st.sampled_from([0.1, 0.25, 1.0]))
def test_a_plan_that_runs_still_runs_when_a_node_joins(nodes, extra, workers, cpus, decode, light):
    """Adding capacity never turns an accepted plan (a fixed group) into a refused one, and an accepted
    plan leaves every stage a node and a budget it fits in."""
    plan = stream({"CPU": decode}, light)
    try:
        resources.check(nodes, {"CPU": cpus}, workers, workers, plan)
    except ResourcePlanError:
        return
    left = resources.place_workers(nodes, {"CPU": cpus}, workers)
    budget = sum(n["CPU"] for n in nodes) - workers * cpus
    for stage in plan["train"]:
        assert any(free["CPU"] + 1e-9 >= stage.request["CPU"] for free in left)
        assert budget + 1e-9 >= stage.request["CPU"]
    resources.check([*nodes, extra], {"CPU": cpus}, workers, workers, plan)  # must not raise


def _stops_after(items: int, release: threading.Event):
    yield from range(items)
    release.wait()  # a stream whose tasks never run: no next batch until released
    yield items


def test_the_watchdog_warns_after_one_period_and_fails_after_two():
    release, said = threading.Event(), []
    with ThreadPoolExecutor(1) as pool:
        try:
            diagnosis = "stage decode waits for CPU 0.5"
            watched = Watched(_stops_after(2, release), 0.3, lambda: diagnosis, said.append, pool)
            assert [next(watched), next(watched)] == [0, 1]
            started = time.monotonic()
            with pytest.raises(DataStall, match="stage decode waits for CPU 0.5; no batch for 0.6 s"):
                next(watched)
            assert time.monotonic() - started >= 0.6
            assert len(said) == 1 and "no batch for 0.3 s" in said[0] and diagnosis in said[0]
        finally:
            release.set()  # the helper thread, still in next(), ends


def test_the_watchdog_passes_batches_errors_and_the_end_through():
    with ThreadPoolExecutor(1) as pool:
        assert list(Watched(iter(range(5)), 5.0, str, print, pool)) == [0, 1, 2, 3, 4]

        def broken():
            yield 1
            raise OSError("storage gone")

        watched = Watched(broken(), 5.0, str, print, pool)
        assert next(watched) == 1
        with pytest.raises(OSError, match="storage gone"):
            next(watched)
        assert list(Watched(iter(range(3)), 0, str, print, pool)) == [0, 1, 2]  # 0: no watchdog


def test_the_group_watch_warns_then_aborts_a_group_that_shows_no_life(capsys):
    aborted = threading.Event()
    with GroupWatch(lambda: 0, 0.2, lambda: "the group asks for 3 x {CPU 1.5}", aborted.set) as watch:
        assert aborted.wait(5)
    assert watch.failure.startswith("the training workers showed no sign of life for 0.4 s")
    assert "the group asks for 3 x {CPU 1.5}" in watch.failure
    out = capsys.readouterr().out
    assert "warning: the training workers showed no sign of life for 0.2 s" in out


def test_the_group_watch_stays_quiet_while_the_group_beats_and_only_warns_without_an_abort(capsys):
    beats = iter(range(10**6))
    with GroupWatch(lambda: next(beats), 0.1, str, None) as watch:
        time.sleep(0.5)
    assert watch.failure is None and "warning" not in capsys.readouterr().out
    with GroupWatch(lambda: 7, 0.1, lambda: "stuck", None) as watch:
        time.sleep(0.45)
    assert watch.failure is None and capsys.readouterr().out.count("warning: the training workers") >= 2


def test_a_validation_pass_is_watched_with_the_workers_stall_timeout():
    release, said = threading.Event(), []
    watchdog.set_stall_timeout(0.2)
    try:
        passes = watchdog.watch(_stops_after(1, release), said.append)
        assert next(passes) == 0
        # the diagnosis before it depends on whether this process runs Ray (the suite's session does)
        stopped = r"; no batch for 0.4 s \(train.stall_timeout_s\), so the run stops"
        with pytest.raises(DataStall, match=stopped):
            next(passes)
        assert len(said) == 1
    finally:
        release.set()
        watchdog.set_stall_timeout(0.0)
    assert list(watchdog.watch(iter(range(3)), said.append)) == [0, 1, 2]  # 0: no watchdog
