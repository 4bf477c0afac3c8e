"""A two-node Ray cluster on 127.0.0.1 (``ray.cluster_utils.Cluster``: a head and a second node of 2 CPUs
each) whose training workers take 1.5 CPUs of each node, run by tests/train/test_nearly_full_cluster.py in
a process of its own (this process's Ray is that cluster, not the test session's).

1. A plan whose decode tasks (1 CPU) fit no node beside the workers is refused before training starts.
2. With the check off, the same plan starts, its stream never runs, and the stall watchdog fails the run
   with its diagnosis after two periods of ``train.stall_timeout_s``.
3. The issue's starved configuration (decode tasks of 0.5 CPU) with ``scaling.num_workers [1, 2]`` trains;
   the second node is then lost for good, the group restarts with one worker on the head, and the run
   finishes at its last step.
4. With the check off, a group of three such workers, which the cluster cannot place, is stopped by the
   driver's group watch after two periods of ``scaling.group_timeout_s``, with what the group asks for and
   what the cluster has free (last: Ray Train's controller of that run may outlive the abort).

Prints one ``RESULT {json}`` line per scenario. conftest.py starts it in the background as soon as the
test is collected, so its waits (two watchdog periods, twice; a node's death) overlap the tests before it.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "20")  # a lost node's group gives up sooner

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import ray  # noqa: E402
from conftest import free_port  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from helpers.runs import committed_checkpoint, pretrain_in_thread, tiny_config  # noqa: E402
from pipeline.data.synthetic import make_dataset  # noqa: E402
from pipeline.train.pretrain import run_pretrain  # noqa: E402
from pipeline.train.resources import ResourcePlanError  # noqa: E402

STEPS = 12


def main(work: Path) -> None:
    # the cluster's own address in its processes' environment: Ray's state API, asked with no address inside
    # the cluster (Ray Train's placement group cleaner), otherwise asks the newest Ray on the machine, here
    # the test session's or another test's, and could remove the placement group of a live run
    gcs_port = free_port()
    os.environ["RAY_ADDRESS"] = f"{ray.util.get_node_ip_address()}:{gcs_port}"
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False,
                                                            "gcs_server_port": gcs_port})
    assert cluster.address == os.environ["RAY_ADDRESS"], (cluster.address, os.environ["RAY_ADDRESS"])
    second = cluster.add_node(num_cpus=2)
    ray.init(address=cluster.address)
    data = work / "videos"
    make_dataset(str(data), videos_per_class=3, num_frames=24, size=(48, 64), seed=0)
    nearly_full = {"scaling.cpus_per_worker": "1.5", "data.decode_num_cpus": "0.5",
                   "scaling.num_workers": "[1,2]", "scaling.resize_interval_s": "600",
                   "train.stall_timeout_s": "60"}
    started = time.monotonic()
    try:
        run_pretrain(tiny_config(work / "refused", str(data), **{**nearly_full, "data.decode_num_cpus": "1"}))
        print("RESULT " + json.dumps({"scenario": "refused", "error": None}), flush=True)
    except ResourcePlanError as e:
        print("RESULT " + json.dumps({"scenario": "refused", "error": str(e),
                                      "seconds": time.monotonic() - started}), flush=True)

    stalled = {**nearly_full, "data.decode_num_cpus": "1", "scaling.check_resources": "false",
               "scaling.num_workers": "2", "scaling.max_failures": "0", "train.stall_timeout_s": "8",
               "run_name": "stalled"}
    started = time.monotonic()
    try:
        run_pretrain(tiny_config(work / "stalled", str(data), **stalled))
        print("RESULT " + json.dumps({"scenario": "stalled", "error": None}), flush=True)
    except Exception as e:  # noqa: BLE001 - reported to the test
        print("RESULT " + json.dumps({"scenario": "stalled", "error": str(e),
                                      "seconds": time.monotonic() - started}), flush=True)

    cfg = tiny_config(work / "elastic", str(data), **nearly_full, **{
        "run_name": "nearly-full", "train.max_steps": str(STEPS), "checkpoint.every_steps": "4",
        "train.log_every_steps": "4"})
    thread, outcome = pretrain_in_thread(cfg)
    run_dir = work / "elastic" / "runs" / "nearly-full"
    deadline = time.monotonic() + 240
    while (committed_checkpoint(run_dir) or "") < "checkpoint_00000004":
        if not thread.is_alive() or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    lost_at = committed_checkpoint(run_dir)
    cluster.remove_node(second, allow_graceful=False)
    thread.join(timeout=400)
    result = outcome.get("result")
    print("RESULT " + json.dumps({
        "scenario": "elastic", "lost_after": lost_at, "alive": thread.is_alive(),
        "error": repr(outcome.get("error")) if "error" in outcome else None,
        "final_step": result.final_step if result else None}), flush=True)
    never = {**stalled, "scaling.num_workers": "3", "data.decode_num_cpus": "0.5", "run_name": "never",
             "scaling.group_timeout_s": "8", "train.stall_timeout_s": "300"}
    started = time.monotonic()
    try:
        run_pretrain(tiny_config(work / "never", str(data), **never))
        print("RESULT " + json.dumps({"scenario": "never", "error": None}), flush=True)
    except Exception as e:  # noqa: BLE001 - reported to the test
        print("RESULT " + json.dumps({"scenario": "never", "error": f"{type(e).__name__}: {e}",
                                      "seconds": time.monotonic() - started}), flush=True)

    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
