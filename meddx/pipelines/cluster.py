"""The Ray cluster as meddx uses it: joining or starting it, and sizing work to its nodes.

Every rule about how many CPUs, threads, blocks and actors a stage gets lives here, so
scoring and training apply the same ones.
"""

from __future__ import annotations

import atexit
import importlib
import logging
import os
import threading
import uuid
import warnings
from collections.abc import Mapping

import psutil
import ray

from meddx import secret
from meddx.model.forward import node_cpus

log = logging.getLogger(__name__)
# A CPU predictor holds the model (resnet50: 100 MB), torch's runtime and a batch's
# activations (resnet18 at batch 64 peaked at 970 MiB).
PREDICTOR_MEMORY = 3 * 2**29
MAX_ACTOR_CPU = 0.5  # what a CPU predictor actor reserves at most (see predictor_pool)
INPUTS_PER_CPU_ACTOR = 1000  # a CPU job this long gets one more predictor actor
# Small read tasks keep every CPU busy and memory flat: about this many objects a block.
OBJECTS_PER_BLOCK = 64


def init_ray(dashboard: bool = False, quiet_libraries: bool = False) -> None:
    """Join the cluster this runs on (``ray job submit``) or start a local one.
    ``quiet_libraries``: every worker of the job runs ``quiet_worker_logs`` as it starts
    (a runtime environment costs a scoring run about a second of start-up; a training
    run's workers print Ray Train's and Ray Data's lines without it)."""
    if not ray.is_initialized():
        # No usage reports leave the machine. A local scoring run skips the dashboard
        # (its processes cost seconds of start-up and a share of the CPUs); training
        # keeps it, as Ray Train watches its workers through the state API it serves.
        # Joining a cluster ignores the flag.
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        # A local cluster of meddx's own gets Ray's default token auth; Ray's warning
        # that it did is noise on every run (joining a cluster never says it).
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(
            logging.ERROR
        )
        # Nor does it say that it started or joined one: Ray starts before a run lists
        # its inputs, and a missing input must stay a one-line error.
        logging.getLogger("ray._private.worker").addFilter(_not_start_or_join)
        ray.init(
            include_dashboard=None if dashboard else False,  # None: when installed
            log_to_driver=os.environ.get("MEDDX_QUIET_WORKERS") is None,
            runtime_env=(
                {"worker_process_setup_hook": "meddx.pipelines.cluster.quiet_worker_logs"}
                if quiet_libraries
                else None
            ),
        )
        # Ray's own exit handler waits half a second for log lines before stopping
        # what it started; the rows are committed by then, so stop it at once (this
        # handler runs first, and Ray's then finds nothing to do).
        atexit.register(stop_ray)
        warn_secrets_in_runtime_env()
    # meddx shows its own progress, counted from written rows (progress.py): Ray Data's
    # bars stay off, and so does its warning that they are.
    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    # Its own lines here (the plan, its log folder, "execution finished", "data sink
    # finished") stay in its log file (the session's logs/ray-data): its console handler
    # shows warnings and errors.
    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler):
            handler.setLevel(max(handler.level, logging.WARNING))


def warn_secrets_in_runtime_env() -> None:
    """A warning, one line naming the variables, when the job this driver belongs to
    carries secrets in its runtime_env (``ray job submit --runtime-env-json``): Ray
    keeps that in the job's metadata, which its dashboard and ``ray job list`` show."""
    line = secret.runtime_env_warning(ray.get_runtime_context().runtime_env)
    if line:
        log.warning("meddx: %s", line)


def quiet_worker_logs() -> None:
    """Run in each of a meddx job's Ray workers as it starts: libraries' INFO lines (Ray
    Train's "Reporting training result", Ray Data's plan and "execution finished", its
    "progress bars disabled") are dropped there, so log_to_driver brings none of them to
    the console; the driver's copies of Ray Data's stay in its log file. Warnings and
    errors still show, and so do meddx's training lines (train_worker.console_lines)."""
    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    logging.getLogger("ray.data._internal.execution.streaming_executor").setLevel(logging.WARNING)
    # Ray Train's dataset manager sets an option Ray Data has deprecated; not ours to fix.
    warnings.filterwarnings("ignore", message="`ExecutionOptions.exclude_resources`")


_START_OR_JOIN = (
    "Started a local Ray instance",
    "Using address ",
    "Connecting to existing Ray cluster",
    "Connected to Ray cluster",
)


def _not_start_or_join(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith(_START_OR_JOIN)


def init_ray_importing(module: str) -> None:
    """init_ray() while another thread imports ``module``. Ray's start takes seconds,
    mostly waiting on processes of its own, and a scoring driver's imports (torch) take
    a second and a half of one core: they overlap. An import that fails is left for the
    caller's own import to raise."""
    importer = threading.Thread(target=_import_quietly, args=(module,), daemon=True)
    importer.start()
    try:
        init_ray()
    finally:
        importer.join()


def _import_quietly(module: str) -> None:
    try:
        importlib.import_module(module)
    except Exception:  # noqa: BLE001 - the caller imports it again and sees the error
        pass


def stop_ray() -> None:
    """Leave Ray: disconnect from a cluster this process joined, or stop the local one
    it started. Ray's autoscaler monitor, which a local cluster starts and which has
    nothing to do at its end, ignores SIGTERM, and Ray waits a second for it before it
    kills it; it is killed first (stopping took 1.4 s, now 0.4 s)."""
    if not ray.is_initialized():
        return
    for child in psutil.Process().children():
        try:
            if any(arg.endswith(_RAY_MONITOR) for arg in child.cmdline()):
                child.kill()
                child.wait(timeout=5)
        except (psutil.Error, psutil.TimeoutExpired):
            pass
    ray.shutdown()


_RAY_MONITOR = os.path.join("autoscaler", "_private", "monitor.py")


def new_run_id(run_date: str) -> str:
    """One id per run: its date, then enough randomness that two runs never share one."""
    return f"{run_date}-{uuid.uuid4().hex[:12]}"


def threads_per_worker(workers_on_node: int) -> int:
    """torch threads for one of ``workers_on_node`` CPU workers sharing this node."""
    return max(1, node_cpus() // max(1, workers_on_node))


def cpu_share(cpus: float, members: int) -> float:
    """The CPUs each of ``members`` long-lived workers (predictor actors, DDP workers)
    asks of Ray. One CPU always stays free for reading and decoding, or the workers
    would hold every CPU slot and the pipeline would wait on itself."""
    return min(1.0, max(0.1, (cpus - 1) / max(1, members)))


def read_blocks(inputs: int, shards: int = 0) -> int:
    """Blocks for the read stage: about OBJECTS_PER_BLOCK objects each, and at least one
    per tar shard (a shard holds many images)."""
    return max(1, min(inputs, max(shards, -(-inputs // OBJECTS_PER_BLOCK))))


def cpu_nodes() -> int:
    """The cluster's live nodes that have CPUs (at least one)."""
    return max(1, sum(1 for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU")))


def predictor_pool(
    actors: int | None, inputs: int, total: Mapping[str, float], nodes: int = 1
) -> tuple[ray.data.ActorPoolStrategy, int | None, dict[str, float]]:
    """The predictor pool for ``inputs`` on a cluster of ``total`` resources
    (ray.cluster_resources()) and ``nodes`` CPU nodes, torch threads for each actor
    (None: the node's CPUs), and what each actor asks of Ray."""
    gpus = int(total.get("GPU", 0))
    if gpus:
        return ray.data.ActorPoolStrategy(size=actors or gpus), None, {"num_gpus": 1}
    cpus = int(total.get("CPU", 1))
    # On CPU, by default one actor per node uses the node's cores through torch's
    # threads. A long job instead runs up to one single-thread actor per core: separate
    # processes do not stall at each other's thread barriers when a decode task takes a
    # core (resnet18 on 2 cores: 2 x 1 thread 28.0 images/s, 1 x 2 threads 25.4), but
    # each loads its own model, seconds of start-up a short job would not win back.
    # Their memory reservations may take at most half of the cluster's.
    fits = int(total.get("memory", 0) / 2 // PREDICTOR_MEMORY)
    wanted = actors or max(nodes, min(cpus, fits, inputs // INPUTS_PER_CPU_ACTOR))
    threads = max(1, cpus // wanted) if wanted > nodes else None
    # The memory reservation also makes the actors' resources differ from the decode
    # tasks', so Ray does not fuse decoding into the actors: decoding stays on parallel
    # CPU tasks.
    # At most half a CPU each: a lost node's actor restarts on a survivor, and two actors
    # reserving a whole CPU each would hold a 2-CPU node's every slot, so no decode task
    # could run and the pipeline would wait forever. The reservation only schedules; the
    # actor's torch threads are sized above.
    share = min(MAX_ACTOR_CPU, cpu_share(cpus, wanted))
    return (
        ray.data.ActorPoolStrategy(size=wanted),
        threads,
        {"num_cpus": share, "memory": PREDICTOR_MEMORY},
    )


def training_worker_resources(workers: int, use_gpu: bool, cpus: float) -> dict[str, float]:
    """What each DDP worker asks of Ray on a cluster of ``cpus`` CPUs (its torch threads
    are sized on its own node)."""
    if use_gpu:
        return {"CPU": 1, "GPU": 1}
    return {"CPU": cpu_share(cpus, workers)}


def decode_task_cpus(resources: Mapping[str, float], actors: int, cpus: float) -> float:
    """What each read + decode task asks of Ray: on CPU-only clusters just enough less
    than a CPU that decode tasks can fill every core, the predictor actors' reserved
    share included (on 2 CPUs beside an actor holding half of one: 0.75, two at a time;
    with 1 CPU each, one ran at a time and a core idled half the time). The predictor's
    threads and the decode tasks then share the cores through the OS scheduler. Where
    the model runs on GPUs, one CPU each. ``resources``: what each of the ``actors``
    asks (predictor_pool); ``cpus``: the cluster's."""
    if "num_gpus" in resources:
        return 1.0
    held = actors * resources.get("num_cpus", 0)
    return max(0.25, (cpus - held) / cpus) if cpus > held else 1.0
