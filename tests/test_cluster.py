"""How work is sized to a cluster: the rules of meddx.pipelines.cluster on the resources
Ray would report (ray.cluster_resources()), for clusters this machine is not."""

import pytest

from meddx.pipelines.cluster import (
    INPUTS_PER_CPU_ACTOR,
    PREDICTOR_MEMORY,
    cpu_nodes,
    decode_task_cpus,
    predictor_pool,
    training_worker_resources,
)

GIB = 2**30


def sized(actors, inputs, total, nodes=1):
    """(pool size, torch threads, what each actor asks) as predictor_pool decides."""
    pool, threads, resources = predictor_pool(actors, inputs, total, nodes)
    assert pool.min_size == pool.max_size  # a fixed pool: no autoscaling mid-run
    return pool.max_size, threads, resources


def test_one_predictor_per_gpu_or_as_many_as_asked():
    gpus = {"CPU": 32.0, "GPU": 4.0, "memory": 200 * GIB}
    assert sized(None, 10, gpus) == (4, None, {"num_gpus": 1})
    assert sized(None, 10**6, gpus, nodes=2) == (4, None, {"num_gpus": 1})
    assert sized(2, 10**6, gpus) == (2, None, {"num_gpus": 1})


def test_a_small_cpu_node_runs_one_actor_then_one_per_core_for_a_long_job():
    node = {"CPU": 2.0, "memory": 8 * GIB}
    # A short job: one actor using the node's cores through torch's threads. Half a CPU
    # reserved: an actor restarted here after a lost node still leaves a CPU for decoding.
    assert sized(None, 500, node) == (1, None, {"num_cpus": 0.5, "memory": PREDICTOR_MEMORY})
    # A long one: one single-thread actor per core, one CPU left for decoding.
    assert sized(None, 2 * INPUTS_PER_CPU_ACTOR, node) == (
        2,
        1,
        {"num_cpus": 0.5, "memory": PREDICTOR_MEMORY},
    )
    # Asked for: as many as asked, the cores split between them, decoding not starved.
    actors, threads, resources = sized(3, 10, node)
    assert (actors, threads) == (3, 1) and resources["num_cpus"] * 3 <= 1.0


def test_cpu_actors_grow_with_the_job_up_to_the_cores_and_half_the_memory():
    cluster = {"CPU": 32.0, "memory": 400 * GIB}
    # One per node by default, each on its node's cores.
    assert sized(None, 100, cluster, nodes=4)[:2] == (4, None)
    # One more actor per INPUTS_PER_CPU_ACTOR inputs, the cores shared between them.
    assert sized(None, 10 * INPUTS_PER_CPU_ACTOR, cluster, nodes=4)[:2] == (10, 3)
    # ... never more than the cores.
    assert sized(None, 10**6, cluster, nodes=4)[:2] == (32, 1)
    # Their memory reservations take at most half of the cluster's.
    tight = {"CPU": 32.0, "memory": 6 * PREDICTOR_MEMORY}
    assert sized(None, 10**6, tight)[:2] == (3, 10)
    assert sized(None, 10**6, tight, nodes=4)[:2] == (4, None)  # still one per node


def test_decode_tasks_fill_the_cores_the_actors_leave():
    gpu_actor = {"num_gpus": 1}
    assert decode_task_cpus(gpu_actor, 4, cpus=32) == 1.0
    cpu_actor = {"num_cpus": 0.5, "memory": PREDICTOR_MEMORY}
    # 2 CPUs beside one actor holding half of one: two decode tasks at a time.
    assert decode_task_cpus(cpu_actor, 1, cpus=2) == 0.75
    assert decode_task_cpus(cpu_actor, 2, cpus=2) == 0.5
    assert decode_task_cpus(cpu_actor, 16, cpus=16) == 0.5
    assert decode_task_cpus(cpu_actor, 30, cpus=16) == 0.25  # at least a quarter CPU
    assert decode_task_cpus({"num_cpus": 1.0}, 2, cpus=2) == 1.0  # all held: one each


@pytest.mark.parametrize(
    "workers, use_gpu, cpus, expected",
    [
        (2, True, 8, {"CPU": 1, "GPU": 1}),
        (2, False, 2, {"CPU": 0.5}),  # one CPU stays free for reading and decoding
        (2, False, 8, {"CPU": 1.0}),
        (1, False, 1, {"CPU": 0.1}),  # a 1-CPU node: the smallest share
    ],
)
def test_ddp_workers_leave_a_cpu_for_decoding(workers, use_gpu, cpus, expected):
    assert training_worker_resources(workers, use_gpu, cpus) == expected


def test_the_session_cluster_has_one_cpu_node(ray_session):
    assert cpu_nodes() == 1
