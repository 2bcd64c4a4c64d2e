"""The Ray executor on a cluster of several nodes, simulated on one machine.

:class:`ray.cluster_utils.Cluster` starts a head and worker nodes as separate
raylets on this machine; the runs join it by its address, as a user's run
joins a real cluster with ``ray.address``. Nodes may declare GPUs they do not
have: Ray schedules and assigns them like real ones, so the placement of GPU
actors is tested here, while no CUDA code runs. Every test runs on
:mod:`synthetic`'s tiny model and data and checks what landed in the store.
"""

from __future__ import annotations

import collections
import os
import threading
import time

import pytest

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

from harness.run.grid import expand_blocks  # noqa: E402
from harness.run.runner import RunContext  # noqa: E402
from harness.run.scheduler import Executor, RayExecutor, RayOptions, run_cells  # noqa: E402
from harness.run.store import Table, read_table  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")

FAST_NODE_DEATH = {"health_check_period_ms": 500, "health_check_failure_threshold": 4, "health_check_initial_delay_ms": 0}
"""A removed node is declared dead in about 2 s instead of Ray's default 30 s, so its shards come back soon."""


@pytest.fixture(scope="module")
def cluster():
    """A head node with one CPU; each test adds (and removes) its worker nodes with :func:`worker_nodes`."""
    head = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "include_dashboard": False, "_system_config": FAST_NODE_DEATH},
    )
    try:
        yield head
    finally:
        if ray.is_initialized():
            ray.shutdown()
        head.shutdown()


@pytest.fixture
def worker_nodes(cluster):
    """Adds worker nodes (``add(num_cpus=..., num_gpus=...)``) to the cluster; removes those still alive after the test."""
    added = []

    def add(**resources):
        node = cluster.add_node(**resources)
        cluster.wait_for_nodes()
        added.append(node)
        return node

    yield add
    if ray.is_initialized():  # a failed test may leave its driver connected
        ray.shutdown()
    for node in added:
        if node in cluster.worker_nodes:
            cluster.remove_node(node, allow_graceful=False)


def _cells(world, n_examples, iterations):
    return expand_blocks([{
        "dataset": "mnist", "model": world.model, "solver": ["projected_sinkhorn_box", "projected_sinkhorn"],
        "protocol": "paper_code_mnist", "n_examples": n_examples, "iterations": iterations,
    }])


def _context(world, results_dir, device="cpu") -> RunContext:
    return RunContext(str(world.data_root), str(results_dir), str(world.weights_dir), device, gallery_examples=0, verify_workers=0)


def _run(cluster, world, cells, results_dir, shard_size, device="cpu"):
    return run_cells(
        cells, _context(world, results_dir, device), shard_size, Executor.RAY, RayOptions(address=cluster.address),
        progress=False, plugins=[str(world.plugin)],
    )


def _assert_every_row_once(results_dir, cells):
    examples = read_table(results_dir)
    expected = {(cell.cell_id, index) for cell in cells for index in range(cell.n_examples)}
    landed = list(zip(examples["cell_id"], examples["example_index"]))
    assert len(landed) == len(expected) and set(landed) == expected
    finished = read_table(results_dir, Table.CELLS)
    assert sorted(finished["cell_id"]) == sorted(cell.cell_id for cell in cells)
    assert (finished["status"] == "complete").all()


def test_shards_fan_out_over_the_nodes_and_land_once(cluster, worker_nodes, world, tmp_path):
    first, second = worker_nodes(num_cpus=1), worker_nodes(num_cpus=1)
    # Shards of some seconds each, so that no actor finishes the grid before the others have started.
    cells = _cells(world, n_examples=6, iterations=60)
    report = _run(cluster, world, cells, tmp_path, shard_size=2)
    assert not report.failures and report.shards_run == 6
    _assert_every_row_once(tmp_path, cells)
    nodes = {cluster.head_node.node_id, first.node_id, second.node_id}
    assert set(report.shards_by_node) <= nodes and len(report.shards_by_node) >= 2
    assert sum(report.shards_by_node.values()) == report.shards_run


def test_a_node_lost_mid_run_has_its_shards_rerun_elsewhere(cluster, worker_nodes, world, tmp_path):
    doomed, _ = worker_nodes(num_cpus=1), worker_nodes(num_cpus=1)
    cells = _cells(world, n_examples=8, iterations=150)
    removed = threading.Event()

    def remove_the_node_after_the_first_shard():
        deadline = time.time() + 120
        while time.time() < deadline and not any((tmp_path / Table.EXAMPLES.value).rglob("shard-*.parquet")):
            time.sleep(0.05)
        cluster.remove_node(doomed, allow_graceful=False)
        removed.set()

    remover = threading.Thread(target=remove_the_node_after_the_first_shard, daemon=True)
    remover.start()
    report = _run(cluster, world, cells, tmp_path, shard_size=2)
    remover.join(timeout=30)
    assert removed.is_set()
    # The lost node's actor held a shard (every actor is busy while shards wait); its replacement
    # finds no free CPU on the two nodes left and must not be handed that shard.
    assert not report.failures and report.replaced_actors >= 1
    assert report.shards_run == 8 and sum(report.shards_by_node.values()) == 8
    _assert_every_row_once(tmp_path, cells)


def _actor_view(actor):
    """What an actor sees of its GPUs, and the device its runner was given and resolved."""
    return ray.get(actor.__ray_call__.remote(lambda shard_actor: {
        "node": ray.get_runtime_context().get_node_id(),
        "gpu_ids": [str(gpu) for gpu in ray.get_gpu_ids()],
        "visible": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "device_setting": shard_actor.runner.context.device,
        "device": shard_actor.runner.device.type,
        "cuda_available": __import__("torch").cuda.is_available(),
    }))


def _started_actors(world, cells, address, device):
    """A Ray executor joined to ``address``, once each of its actors has started (the executor, to close)."""
    executor = RayExecutor(cells, _context(world, "unused", device), RayOptions(address=address), [str(world.plugin)], None)
    while executor.starting:
        executor.collect()
    return executor


def test_one_actor_per_declared_gpu_and_auto_follows_the_gpus_ray_assigned(cluster, worker_nodes, world):
    two_gpus, one_gpu = worker_nodes(num_cpus=2, num_gpus=2), worker_nodes(num_cpus=1, num_gpus=1)
    executor = _started_actors(world, _cells(world, 2, 5), cluster.address, device="auto")
    try:
        views = [_actor_view(actor) for actor in executor.actors]
    finally:
        executor.close()
    assert collections.Counter(view["node"] for view in views) == {two_gpus.node_id: 2, one_gpu.node_id: 1}
    for view in views:
        # Ray hides every GPU but the assigned one, so device=auto resolves to CUDA exactly where a GPU was
        # assigned; this machine has no CUDA, so the declared GPU resolves to the CPU here.
        assert len(view["gpu_ids"]) == 1 and view["visible"] == view["gpu_ids"][0]
        assert view["device_setting"] == "auto"
        assert view["device"] == ("cuda" if view["cuda_available"] else "cpu")
    assert len({(view["node"], view["visible"]) for view in views}) == 3  # no GPU given to two actors


def test_without_gpus_the_actors_run_on_the_cpu_whatever_the_device_setting(cluster, worker_nodes, world):
    worker_nodes(num_cpus=1)
    executor = _started_actors(world, _cells(world, 2, 5), cluster.address, device="auto")
    try:
        views = [_actor_view(actor) for actor in executor.actors]
    finally:
        executor.close()
    assert {view["node"] for view in views} == {cluster.head_node.node_id, *(node.node_id for node in cluster.worker_nodes)}
    assert all(view["gpu_ids"] == [] and view["device_setting"] == "cpu" and view["device"] == "cpu" for view in views)


def test_gpu_actors_only_on_gpu_nodes_and_one_that_finds_no_room_holds_no_shard(cluster, worker_nodes, world, tmp_path):
    """Two declared GPUs but one CPU on the node: the second GPU actor cannot be placed, and the run still ends."""
    gpu_node, _ = worker_nodes(num_cpus=1, num_gpus=2), worker_nodes(num_cpus=1)
    cells = _cells(world, n_examples=2, iterations=5)
    report = _run(cluster, world, cells, tmp_path, shard_size=1, device="auto")
    assert not report.failures and report.shards_run == 4
    assert report.shards_by_node == {gpu_node.node_id: 4}
    _assert_every_row_once(tmp_path, cells)


def test_cuda_on_a_cluster_without_gpus_is_refused_before_any_work(cluster, worker_nodes, world, tmp_path):
    worker_nodes(num_cpus=1)
    with pytest.raises(ValueError, match=r"device='cuda' asks for CUDA, but the Ray cluster declares no GPU \(2 CPUs\)"):
        _run(cluster, world, _cells(world, n_examples=2, iterations=5), tmp_path, shard_size=1, device="cuda")
    assert not any(tmp_path.rglob("*.parquet"))


def test_an_embedded_run_starts_its_own_ray_beside_a_running_cluster(cluster, world, tmp_path):
    """Without ray.address the run's Ray is its own: it never joins a cluster another process started here."""
    cells = _cells(world, n_examples=2, iterations=5)
    report = run_cells(cells, _context(world, tmp_path), 2, Executor.RAY, RayOptions(num_cpus=1), progress=False,
                       plugins=[str(world.plugin)])
    assert not report.failures and report.shards_run == 2
    assert not set(report.shards_by_node) & {node.node_id for node in [cluster.head_node, *cluster.worker_nodes]}
    _assert_every_row_once(tmp_path, cells)
