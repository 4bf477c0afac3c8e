"""A job on a cluster nearly full with training workers: refused when its data stream cannot run beside
them; failed by the stall watchdog (with what the stream waits for) when the check is turned off; stopped
by the driver's watch when its worker group cannot form; and trained to its last step when the stream
fits, through the loss of one of its two nodes (tests/helpers/nearly_full_cluster.py runs the two-node
cluster in a process of its own, started when this test is collected so that its waits overlap the tests
before it)."""

from __future__ import annotations

import re

import pytest
from conftest import background_results

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def outcome(request) -> dict[str, dict]:
    """The script's results: started in the background at collection (conftest.py), else now."""
    # inside the suite's 600 s a test: alone the scenarios took 3 min here, and begun at collection
    # they end before this test comes
    found, log = background_results(request.config, "test_nearly_full_cluster.py", timeout=540)
    results = {r["scenario"]: r for r in found}
    assert len(results) == 4, log[-6000:]
    results["stalled"]["log"] = log
    return results


def test_a_plan_whose_decode_tasks_fit_no_node_beside_the_workers_is_refused_at_start(outcome):
    refused = outcome["refused"]
    message = refused["error"]
    assert message and message.startswith("resource plan: the data stream cannot run"), refused
    assert "2 training worker(s) of {CPU 1.5} leave node 0: CPU 0.5; node 1: CPU 0.5" in message
    assert "MapBatches(clips_of_rows) needs {CPU 1} per task" in message
    assert "scaling.cpus_per_worker" in message and "docs/cluster.md" in message


def test_a_stream_that_never_runs_fails_the_run_with_the_watchdogs_diagnosis(outcome):
    stalled = outcome["stalled"]
    message = stalled["error"] or ""  # Ray Train's snippet of the failure: its last 500 characters
    assert "MapBatches(clips_of_rows) {CPU 1}" in message, stalled  # what its decode tasks ask for
    # 0.5 per node beside the workers, less while a light task of the stream runs: never a decode task's 1
    free = re.search(r"the cluster has free: CPU ([0-9.]+) of 4", message)
    assert free and float(free.group(1)) <= 1, message
    assert "fixes: lower scaling.cpus_per_worker" in message
    assert "no batch for 16 s (train.stall_timeout_s), so the run stops" in message
    # the first period's warning came first (from the job's log)
    assert "warning: no batch for 8 s (train.stall_timeout_s);" in stalled["log"]
    # the stages' states join the diagnosis once the stream has reported to Ray Data's stats actor, which a
    # loaded machine had not done 16 s in (seen twice in a full suite): when they are there, no decode task
    # has run
    states = re.findall(r"DataStall: dataset train_\w+: (.*?); its tasks ask for", stalled["log"])
    assert all("MapBatches(clips_of_rows) 0 task(s) done" in s for s in states), states


def test_a_worker_group_that_never_forms_is_stopped_by_the_drivers_watch(outcome):
    never = outcome["never"]
    message = never["error"] or ""
    assert message.startswith("GroupStall: the training workers showed no sign of life for 16 s "
                              "(scaling.group_timeout_s)"), never
    assert "the group asks for 3 worker(s) of {CPU 1.5}" in message
    assert "node(s) alive) has free: CPU " in message


def test_the_starved_configuration_trains_and_survives_losing_a_node(outcome):
    elastic = outcome["elastic"]
    assert elastic["lost_after"] == "checkpoint_00000004", elastic
    assert elastic["error"] is None and not elastic["alive"], elastic
    assert elastic["final_step"] == 12
