"""The Ray Dataset a run scores, top-down as the data flow:

    inputs -> read bytes + [drop already-scored bytes] + decode (CPU tasks)
        -> predict (actor pool, the run's models in each actor, GPU if present) -> rows

(predict: the warm actors of ``keep_warm`` instead, where meddx listen started them)

and the provenance every Parquet file of the run carries in its key-value metadata.
Every input gives at least one row: a read or decode failure is caught per image and
becomes a row with ``status="error"``; the model never sees a bad tensor.
"""

from __future__ import annotations

import contextlib
import functools
import json
import warnings
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.compute as pc
import ray

from meddx import MeddxError, __version__, secret
from meddx.config import ScoreConfig
from meddx.imaging import rules as rule_set
from meddx.imaging.decode import DecodeSettings
from meddx.imaging.rules import DEFAULT as DEFAULT_RULES
from meddx.imaging.rules import RuleSet
from meddx.inputs import reading, shards, storage
from meddx.model import engine, ood, registry
from meddx.model.precision import checkpoint_precision
from meddx.model.predictor import Predictors, WarmPredictors
from meddx.model.registry import Checkpoint
from meddx.names import CPU_BATCH, GPU_BATCH, QC_VALUES
from meddx.pipelines import cluster
from meddx.pipelines.path_names import path_key
from meddx.pipelines.warm import forward, prime
from meddx.store import films

MAX_RULES_BYTES = 1 << 20  # a rules file larger than this is no rules file
# Restarts of a predictor actor whose process died before the run fails (see below).
PREDICTOR_RESTARTS = 3


def resolve_runtime(cfg: ScoreConfig, ckpt: Checkpoint) -> str:
    """torch, or the checkpoint's OpenVINO artefact (on a CPU-only cluster, with --runtime
    auto, when it passed its check): decided once, in the driver, once Ray is up."""
    gpus = int(ray.cluster_resources().get("GPU", 0))
    return engine.resolve_runtime(cfg.runtime, ckpt, gpus)


def file_metadata(
    ckpts: tuple[Checkpoint, ...],
    shas: tuple[str, ...],
    run_id: str,
    cfg: ScoreConfig,
    selection: RuleSet,
    store: films.Store | None = None,
) -> dict[str, str]:
    """Provenance in every Parquet file's key-value metadata (no credentials, no PHI):
    the run's, then each model's under ``meddx.models`` (in --model order), and the
    first model's also at the top, where files of one model have always had it;
    ``selection``: the run's selection rules (``selection_rules``)."""
    models = [model_metadata(ckpt, sha, cfg) for ckpt, sha in zip(ckpts, shas, strict=True)]
    return {
        # The films came through a store (meddx prepare), made by this decoder: "" if not.
        "meddx.store": storage.absolute(store.uri) if store else "",
        "meddx.store_decode_sha256": store.films.sha256 if store else "",
        "meddx.version": __version__,
        "meddx.run_id": run_id,
        "meddx.run_date": cfg.run_date,
        **models[0],
        "meddx.models": json.dumps(models),
        # Quality control: the qc column's values.
        "meddx.qc_values": json.dumps(list(QC_VALUES)),
        # The selection rules images were checked against (imaging/rules.py's data).
        "meddx.rules": json.dumps(selection.as_data(), sort_keys=True),
    }


def model_metadata(ckpt: Checkpoint, sha: str, cfg: ScoreConfig) -> dict[str, str]:
    """One model's provenance, as its rows' files name it."""
    model_runtime = resolve_runtime(cfg, ckpt)
    density = ood.density_of(ckpt)
    return {
        "meddx.model_name": ckpt.model_name,
        "meddx.model_sha256": sha,
        "meddx.class_names": json.dumps(list(ckpt.class_names)),
        "meddx.positive_class": ckpt.positive_class,
        "meddx.threshold": repr(ckpt.threshold),
        # Multi-label: the findings are class_names; label uses one threshold each.
        "meddx.multi_label": json.dumps(ckpt.multi_label),
        "meddx.thresholds": json.dumps(list(ckpt.thresholds)),
        "meddx.input_size": str(ckpt.input_size),
        "meddx.precision": engine.runtime_precision(
            model_runtime, ckpt, checkpoint_precision(cfg.precision, ckpt)
        ),
        "meddx.runtime": model_runtime,
        # The views it accepts, and the ood_score above which a row is
        # out_of_distribution ("" without a density).
        "meddx.views": json.dumps(list(rules(cfg, ckpt)[1])),
        "meddx.ood_threshold": repr(density.threshold) if density else "",
        "meddx.ood_method": "mahalanobis" if density else "",
    }


def rules(cfg: ScoreConfig, ckpt: Checkpoint) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The DICOM modalities and views a model's rows accept (() : any): the run's
    options, else the checkpoint's."""
    modalities = ckpt.modalities if cfg.modalities is None else cfg.modalities
    views = ckpt.views if cfg.views is None else cfg.views
    return tuple(modalities or ()), tuple(views or ())


def selection_rules(cfg, ckpts: tuple[Checkpoint, ...]) -> RuleSet:
    """The selection rules of the run: --rules, else those its checkpoints were trained
    under, else the default. Several models must agree on them (one decode for all)."""
    if cfg.rules:
        return load_rules(cfg.rules, cfg.storage)
    recorded = {json.dumps(c.rules, sort_keys=True) for c in ckpts if c is not None}
    if len(recorded) > 1:
        raise MeddxError(
            "the models were trained under different selection rules: give --rules FILE"
        )
    found = next(iter(recorded), "null")
    data = json.loads(found)
    return rule_set.parse(data, "the checkpoint's rules") if data is not None else DEFAULT_RULES


def load_rules(uri: str, settings) -> RuleSet:
    """A rules file (TOML, or YAML by its name), from local disk or object storage."""
    try:
        text = storage.read_bytes(uri, settings, MAX_RULES_BYTES).decode("utf-8")
    except FileNotFoundError:
        raise MeddxError(f"rules file not found: {uri}") from None
    except (storage.TooLarge, UnicodeDecodeError) as exc:
        raise MeddxError(f"rules file {uri}: {type(exc).__name__}") from None
    return rule_set.loads(text, uri)


def union(rule_sets: list[tuple[str, ...]]) -> tuple[str, ...] | None:
    """What films are decoded for, of several models' rules: None (any) where one takes
    any, else every value one of them takes."""
    if any(not r for r in rule_sets):
        return None
    return tuple(sorted({v for r in rule_sets for v in r}))


def build_dataset(
    cfg: ScoreConfig,
    todo: pa.Table,
    ckpts: tuple[Checkpoint, ...],
    run_id: str,
    shas: tuple[str, ...],
    selection: RuleSet,
    located: dict[str, str] | None = None,
    store: films.Store | None = None,
) -> ray.data.Dataset:
    """inputs -> read + [drop already-scored bytes] + decode -> predict, as a Ray Dataset
    (reading and decoding are one task: the bytes never leave it). ``todo``: the inputs
    as a listing table, with a ``known`` column where some were scored already (their
    content hashes, whose bytes are dropped unread by the model) and ``models`` where
    some need only some of several models; ``located``: each DICOMweb input's locator,
    which the read task fetches it by; ``store``: the store of films (meddx prepare) the
    inputs are read from instead, decoded already; ``selection``: the run's selection
    rules (``selection_rules``), which decoding checks each header against.

    Several models: each film is decoded once, at the largest model's input size and
    for any modality or view one of them accepts; each model then takes it at its own
    size under its own rules (``Predictor.fitted``)."""
    each = [rules(cfg, ckpt) for ckpt in ckpts]
    decode_settings = DecodeSettings(
        size=max(ckpt.input_size for ckpt in ckpts),
        max_pixels=cfg.max_pixels,
        modalities=union([m for m, _ in each]),
        views=union([v for _, v in each]),
        rules=selection,
        pseudonym_key=secret.pseudonym_key(),
    )
    total = ray.cluster_resources()
    uris = todo["image_uri"]
    pool, threads, resources = cluster.predictor_pool(
        cfg.actors, len(uris), total, cluster.cpu_nodes()
    )
    models = predictor_models(cfg, ckpts, shas)
    blocks = cluster.read_blocks(len(uris), shard_count(uris))
    # Ray Data's default keeps part of the CPUs for each stage of the plan; on a small
    # node that let one decode task run at a time while a core idled (2 CPUs, 960 films:
    # cores 53% and 91% busy, 16.7 images/s with an int8 model; without it 93% and 92%,
    # 25.1 images/s). Backpressure on the object store still bounds what is in flight.
    ray.data.DataContext.get_current().op_resource_reservation_enabled = False
    read, read_kwargs = reading.read_objects, {"max_bytes": cfg.max_object_bytes}
    if store is not None:  # each input's stored film, not its bytes
        todo = films.locate(store.uri, cfg.storage, todo)
        # In the order of the files that hold them: a block then reads one night's
        # files, not a piece of every night's.
        first = pc.fill_null(pc.list_element(todo["store_files"], 0), "")
        order = pa.table({"file": first, "uri": todo["image_uri"]})
        todo = todo.take(pc.sort_indices(order, [("file", "ascending"), ("uri", "ascending")]))
        read, read_kwargs = films.read_films, {"store": store.uri}
    ds = ray.data.from_arrow(scored_inputs(todo, located), override_num_blocks=blocks)
    ds = ds.map_batches(
        read,
        fn_kwargs={
            "settings": cfg.storage,
            "decode": decode_settings,
            "path_key": path_key(cfg),
            **read_kwargs,
        },
        batch_size=None,
        num_cpus=cluster.decode_task_cpus(resources, pool.max_size, total.get("CPU", 1)),
    )
    batch_size = cfg.batch_size or (GPU_BATCH if "num_gpus" in resources else CPU_BATCH)
    warm = _WARM.get(warm_key(models, cfg))
    if warm is not None:  # meddx listen's actors, up since it started: no start-up
        return ds.map_batches(
            forward, fn_kwargs={"actors": warm, "run_id": run_id}, batch_size=batch_size, num_cpus=0
        )
    with warnings.catch_warnings():
        # max_restarts and max_task_retries have no named parameter yet: Ray 2.60 warns
        # that passing them as remote args is deprecated.
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        return ds.map_batches(
            Predictors,
            fn_constructor_args=(models, cfg.storage, cfg.precision, run_id),
            fn_constructor_kwargs={"threads": threads, "compile_model": cfg.compile_model},
            batch_size=batch_size,
            compute=pool,
            # A predictor whose process dies (OOM kill, lost node, preempted GPU) is
            # restarted and its unfinished batches re-run: the model is pure, so a re-run
            # batch gives the same rows, and Ray Data writes each block once. The restarts
            # are bounded, so a batch that kills its actor every time fails the run instead
            # of looping. Its batches retry until then: while Ray has not yet declared a lost
            # node dead (seconds of health checks), each try fails at once as "actor
            # unavailable", and a fixed number of tries ran out before the restart came.
            max_restarts=PREDICTOR_RESTARTS,
            max_task_retries=-1,
            **resources,
        )


def predictor_models(cfg: ScoreConfig, ckpts: tuple[Checkpoint, ...], shas) -> list[dict]:
    """What each predictor actor loads: every model's checkpoint, hash, runtime and,
    where decoding applied several models' rules, its own."""
    several = len(ckpts) > 1
    return [
        {
            "checkpoint": path,
            "sha256": sha,
            "runtime": resolve_runtime(cfg, ckpt),
            # Decoding applied one model's own rules; several models', each its own.
            "modalities": modalities if several else None,
            "views": views if several else None,
        }
        for path, ckpt, sha, (modalities, views) in zip(
            cfg.models, ckpts, shas, [rules(cfg, c) for c in ckpts], strict=True
        )
    ]


# Warm predictor actors (keep_warm), by what they load: a run whose models they are
# sends its decoded batches to them instead of starting a pool.
_WARM: dict[str, list] = {}


def warm_key(models: list[dict], cfg: ScoreConfig) -> str:
    return json.dumps([models, cfg.precision, cfg.compile_model], sort_keys=True, default=str)


@contextlib.contextmanager
def keep_warm(cfg: ScoreConfig) -> Iterator[tuple[tuple[Checkpoint, ...], tuple[str, ...]]]:
    """Predictor actors for ``cfg``'s models, started now and kept up until the block
    ends: every run of these models in this process in the meantime uses them (meddx
    listen's batches). They ask of Ray what a pool's actors do and restart as they do.
    Yields the checkpoints and their hashes, as read."""
    read = [registry.read_checkpoint(m, cfg.storage, cfg.model_sha256) for m in cfg.models]
    ckpts, shas = tuple(c for c, _ in read), tuple(s for _, s in read)
    models = predictor_models(cfg, ckpts, shas)
    total = ray.cluster_resources()
    # Sized as a pool for a short job: one actor per node, using the node's cores.
    pool, threads, resources = cluster.predictor_pool(cfg.actors, 0, total, cluster.cpu_nodes())
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        actor = ray.remote(WarmPredictors).options(
            max_restarts=PREDICTOR_RESTARTS, max_task_retries=-1, **resources
        )
        actors = [
            actor.remote(
                models, cfg.storage, cfg.precision, threads=threads, compile_model=cfg.compile_model
            )
            for _ in range(pool.max_size)
        ]
    ray.get([a.ready.remote() for a in actors])  # the models loaded before the first batch
    cpus = max(1, int(total.get("CPU", 1)))
    ray.data.range(cpus, override_num_blocks=cpus).map_batches(prime, batch_size=None).materialize()
    key = warm_key(models, cfg)
    _WARM[key] = actors
    try:
        yield ckpts, shas
    finally:
        del _WARM[key]
        for a in actors:
            ray.kill(a)


def shard_count(uris: pa.ChunkedArray) -> int:
    """How many of the inputs are tar shards (``shards.is_shard``), counted by Arrow."""
    lower = pc.utf8_lower(storage.shards_of(uris))
    found = [pc.ends_with(lower, suffix) for suffix in shards.SHARD_SUFFIXES]
    return pc.sum(functools.reduce(pc.or_, found)).as_py() or 0


def scored_inputs(todo: pa.Table, located: dict[str, str] | None) -> pa.Table:
    """The table the read stage gets: image_uri, a DICOMweb input's locator, the
    ``known`` hashes where the selection gave them and a store's files (size and mtime
    stay behind)."""
    wanted = ("image_uri", "known", "models", "store_files")
    table = todo.select([c for c in wanted if c in todo.column_names])
    if located:  # the night's instances only
        locators = [located[u] for u in todo["image_uri"].to_pylist()]
        table = table.append_column("locator", pa.array(locators, pa.string()))
    return table
