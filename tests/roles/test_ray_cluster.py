"""Roles on a Ray cluster of two simulated nodes (Ray's own `ray.cluster_utils.Cluster`: a head
and a second raylet on this machine, CPU only): placement, learning, faults, nothing left behind.
The supervisor is a real `respec launch` process that joins the cluster as its driver."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from respec_async.ledger import audit_run
from respec_async.metrics import read_metrics
from tests.roles.conftest import rl_config
from tests.runtime.conftest import pid_alive

if os.environ.get("CI") and importlib.util.find_spec("ray") is None:
    pytest.fail("CI installs Ray (the test extra), so these tests must run there", pytrace=False)
ray_cluster_utils = pytest.importorskip("ray.cluster_utils", reason="Ray is not installed (pip install 'respec-async[ray]')")

pytestmark = [pytest.mark.process, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
# Ray notices a dead node after a few missed health checks; make that seconds, not half a minute.
FAST_HEALTH = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 1000, "health_check_failure_threshold": 3}


class TwoNodes:
    """A head and a second node (resources "head" and "second"); with `spare`, a third node that
    can hold what the second holds (both also have "generator_node")."""

    def __init__(self, spare: bool = False) -> None:
        self.cluster = ray_cluster_utils.Cluster(
            initialize_head=True, connect=False,
            head_node_args={"num_cpus": 4, "resources": {"head": 4}, "_system_config": FAST_HEALTH})
        self.second = self.cluster.add_node(num_cpus=4, resources={"second": 4, "generator_node": 4},
                                            labels={"tier": "second"})
        self.spare = self.cluster.add_node(num_cpus=4, resources={"generator_node": 4}) if spare else None
        self.cluster.wait_for_nodes()
        self.address = self.cluster.address

    def ray_pids(self) -> list[int]:
        """Ray's own processes on every node (GCS, raylets, log monitors, ...)."""
        nodes = [self.cluster.head_node, self.second] + ([self.spare] if self.spare else [])
        return [info.process.pid for node in nodes
                for infos in node.all_processes.values() for info in infos if info.process is not None]

    def shutdown(self) -> None:
        self.cluster.shutdown()


def cluster_fixture(spare: bool):
    nodes = TwoNodes(spare)
    pids = nodes.ray_pids()
    assert pids and all(pid_alive(p) for p in pids)
    yield nodes
    nodes.shutdown()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(pid_alive(p) for p in pids):
        time.sleep(0.2)
    assert [p for p in pids if pid_alive(p)] == [], "Ray processes left behind"


@pytest.fixture
def two_nodes():
    yield from cluster_fixture(spare=False)


@pytest.fixture
def three_nodes():
    yield from cluster_fixture(spare=True)


def on_ray(nodes: TwoNodes, tmp_path: Path, *, generator_on: str | None = "second") -> list[str]:
    """--set overrides that run a config on the nodes: the trainer and the reward role on the head,
    the generator on a node with the `generator_on` resource (None: as the test says)."""
    return ["supervisor.launcher=ray", f'supervisor.ray_address="{nodes.address}"', "transport.scheme=tcp",
            f'ray.local_dir="{tmp_path / "nodes"}"', "ray.placement_timeout_s=20.0",
            "ray.trainer.resources={head = 1}", "ray.reward.resources={head = 1}",
            *([f"ray.generator.resources={{{generator_on} = 1}}"] if generator_on else [])]


def placed(run) -> dict[str, dict]:
    return {e["role"]: e for e in run.events() if e.get("event") == "role.placed"}


def assert_nothing_left(run) -> None:
    """Our role processes and the actors that hosted them are gone once the supervisor exits."""
    ours = [p for pids in run.role_pids().values() for p in pids] + [e["host_pid"] for e in placed(run).values()]
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(pid_alive(p) for p in ours):
        time.sleep(0.2)
    assert ours and [p for p in ours if pid_alive(p)] == []


def test_tiny_learns_with_the_generator_and_the_trainer_on_different_nodes(launch, two_nodes, tmp_path):
    toml = f'extends = "{REPO / "configs" / "tiny.toml"}"\n' + """
[run]
final_eval = false
[supervisor]
live_status = false
[trainer]
num_steps = 30
"""
    run = launch(toml, *on_ray(two_nodes, tmp_path))
    assert run.proc.wait(timeout=400) == 0, run.output()
    where = placed(run)
    assert where["generator-0"]["node_id"] == two_nodes.second.node_id
    assert where["trainer-0"]["node_id"] == two_nodes.cluster.head_node.node_id
    # Each machine's roles work in its own node-local directory (one machine here: one directory).
    dirs = {Path(e["dir"]) for e in where.values()}
    assert len(dirs) == 1 and dirs.pop().parent.parent == tmp_path / "nodes"  # <local_dir>/<run>/<host>
    # Copied back into the supervisor's run directory: the trainer's metrics, every role's logs.
    records = read_metrics(run.run_dir / "metrics.jsonl")
    assert len(records) == 30
    assert any(e.get("event") == "weights.applied" for e in run.events("generator-0"))
    assert (run.run_dir / "logs" / "generator-0.log").exists()
    ledger = audit_run(run.run_dir)
    assert ledger is not None and ledger.finished and ledger.balanced and ledger.num_lost == 0
    first = sum(r.reward_mean for r in records[:5]) / 5
    last = sum(r.reward_mean for r in records[-5:]) / 5
    assert last - first >= 0.1, (first, last)
    assert_nothing_left(run)


def test_a_sigkilled_role_on_the_second_node_is_restarted_there(launch, two_nodes, tmp_path, random_actor_dir):
    # The generator pinned by a node label this time (any node's CPU would do as a resource).
    run = launch(rl_config(random_actor_dir, steps=10), *on_ray(two_nodes, tmp_path, generator_on=None),
                 'ray.generator.labels={tier = "second"}')
    run.wait_event(lambda e: e.get("event") == "train.step" and e.get("step") == 2, timeout=180)
    assert placed(run)["generator-0"]["node_id"] == two_nodes.second.node_id
    os.kill(run.role_pids()["generator-0"][0], signal.SIGKILL)
    code = run.proc.wait(timeout=240)
    assert code == 0, run.output()
    assert len(run.role_pids()["generator-0"]) == 2
    restarted = [e for e in run.events() if e.get("event") == "role.started" and e.get("role") == "generator-0"][1]
    assert restarted["node_id"] == two_nodes.second.node_id[:12]
    records = read_metrics(run.run_dir / "metrics.jsonl")
    trained = sorted(g for r in records for g in r.group_ids)
    assert trained == list(range(10 * 3))  # no group lost, none trained twice
    ledger = audit_run(run.run_dir)
    assert ledger.balanced and ledger.num_lost == 0 and ledger.num_reissues >= 1
    assert_nothing_left(run)


def kill_raylet(node) -> None:
    """SIGKILL the node's raylet (the workers it started, our role hosts among them, go with it),
    then let the cluster forget the node's other processes."""
    raylet = node.all_processes["raylet"][0].process
    raylet.kill()
    raylet.wait(timeout=30)


def test_a_lost_node_whose_role_no_other_node_can_hold_fails_the_run_naming_it(launch, two_nodes, tmp_path,
                                                                               random_actor_dir):
    toml = rl_config(random_actor_dir, steps=200).replace("ping_timeout_s = 20.0", "ping_timeout_s = 6.0")
    run = launch(toml, *on_ray(two_nodes, tmp_path), "ray.placement_timeout_s=8.0")
    run.wait_event(lambda e: e.get("event") == "train.step" and e.get("step") == 2, timeout=180)
    lost_at = time.monotonic()
    kill_raylet(two_nodes.second)
    code = run.proc.wait(timeout=90)
    took = time.monotonic() - lost_at
    assert code == 1, run.output()
    failed = next(e for e in run.events() if e.get("event") == "run.failed")
    reason = failed["reason"]
    assert "generator-0" in reason and two_nodes.second.node_id in reason and "no other node took it" in reason
    assert "second: 1" in reason  # what it asked for, which no live node has
    assert took < 6.0 + 8.0 + 20.0, took  # the ping timeout, the placement timeout: never a hang
    assert_nothing_left(run)


def test_a_generator_whose_node_is_lost_starts_on_another_and_the_run_completes(launch, three_nodes, tmp_path,
                                                                                random_actor_dir):
    # Enough steps that the loss is noticed mid-run (a step takes ~0.1 s here; the role hosts
    # outlive their raylet by a few seconds, generating meanwhile).
    toml = rl_config(random_actor_dir, steps=120).replace("ping_timeout_s = 20.0", "ping_timeout_s = 6.0")
    run = launch(toml, *on_ray(three_nodes, tmp_path, generator_on="generator_node"))
    run.wait_event(lambda e: e.get("event") == "train.step" and e.get("step") == 2, timeout=180)
    first = placed(run)["generator-0"]["node_id"]
    lost = three_nodes.second if first == three_nodes.second.node_id else three_nodes.spare
    other = three_nodes.spare if lost is three_nodes.second else three_nodes.second
    kill_raylet(lost)
    assert run.proc.wait(timeout=240) == 0, run.output()
    moved = [e for e in run.events() if e.get("event") == "role.placed" and e.get("moved")]
    assert [(e["role"], e["node_id"]) for e in moved] == [("generator-0", other.node_id)], "\n".join(str(x) for x in [
        (e.get("event"), e.get("role"), e.get("why"), e.get("reason")) for e in run.events() if e.get("event") != "train.step"])
    assert any(e.get("event") == "peer.moved" and e.get("role") == "generator-0" for e in run.events("trainer-0"))
    records = read_metrics(run.run_dir / "metrics.jsonl")
    assert sorted(g for r in records for g in r.group_ids) == list(range(120 * 3))  # none lost, none twice
    # No re-issue count is asserted: a host outlives its raylet, so whether the lost generator
    # still held groups when the loss was noticed is timing (a local run saw 0); what it held,
    # if anything, must be re-issued and trained once: the group-id check above and the ledger.
    ledger = audit_run(run.run_dir)
    assert ledger.balanced and ledger.num_lost == 0, ledger.summary()
    assert_nothing_left(run)


@pytest.mark.parametrize("ask", ['ray.trainer.resources={big_memory_node = 1}', 'ray.trainer.labels={zone = "b"}'])
def test_resources_or_labels_no_node_has_fail_the_start_at_once_naming_them(launch, two_nodes, tmp_path,
                                                                           random_actor_dir, ask):
    run = launch(rl_config(random_actor_dir), *on_ray(two_nodes, tmp_path), ask)
    started = time.monotonic()
    assert run.proc.wait(timeout=60) == 1
    output = run.output()
    assert time.monotonic() - started < 30
    named = "big_memory_node: 1" if "resources" in ask else "labels zone=b"
    assert "trainer-0" in output and named in output and "ray.trainer" in output and "tier=second" in output, output


def test_sigint_stops_a_ray_run_cleanly_and_resume_goes_on_from_the_trainers_node(launch, two_nodes, tmp_path,
                                                                                   random_actor_dir):
    run = launch(rl_config(random_actor_dir, steps=8), *on_ray(two_nodes, tmp_path))  # checkpoints every 2 steps
    run.wait_event(lambda e: e.get("event") == "train.step" and e.get("step") == 3, timeout=180)
    assert run.stop(signal.SIGINT) == 130, run.output()
    interrupted = next(e for e in run.events() if e.get("event") == "run.interrupted")
    assert 4 <= interrupted["steps_done"] < 8  # the trainer's metrics, copied back before the exit
    assert_nothing_left(run)
    proc = subprocess.run([sys.executable, "-m", "respec_async.cli", "launch", "--resume", str(run.run_dir)],
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    resumed = [e for e in run.events() if e.get("event") == "trainer.resumed"]
    assert resumed and resumed[0]["version"] >= 2, resumed  # its checkpoint, found on its node
    records = read_metrics(run.run_dir / "metrics.jsonl")
    assert [r.step for r in records] == list(range(8)) and records[-1].version == 8
    ledger = audit_run(run.run_dir)
    assert ledger.balanced and ledger.num_lost == 0 and ledger.num_trainer_starts == 2, ledger.summary()
    assert_nothing_left(run)
