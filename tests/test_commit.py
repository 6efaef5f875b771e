"""The commit protocol's plan: written by a run that still holds OUT, carried out by the
next run only if every step stays inside OUT. On moto's S3 server and on a local disk."""

import json
import logging
import os
import posixpath
import uuid

import pytest

from meddx import MeddxError
from meddx.inputs.storage import filesystem, strip_scheme
from meddx.store import commit

RUN = "2026-12-01-0123456789ab"
DAY = "dt=2026-12-01"
VICTIM = b"someone else's file"


@pytest.fixture(params=["s3", "local"])
def out(request, tmp_path):
    if request.param == "s3":
        return request.getfixturevalue("bucket") + "/results"
    return str(tmp_path / "results")


@pytest.fixture
def victim(out, settings, tmp_path):
    """A file the run's credentials reach, outside OUT: in another bucket on S3, beside
    OUT on a local disk. Its path as the filesystem names it."""
    fs = filesystem(out, settings)
    if out.startswith("s3://"):
        other = f"victim-{uuid.uuid4().hex[:12]}"
        fs.mkdir(other)
        path = f"{other}/victim.parquet"
        fs.pipe_file(path, VICTIM)
        yield path
        fs.rm(other, recursive=True)
        fs.invalidate_cache()
    else:
        path = str(tmp_path / "elsewhere" / "victim.parquet")
        os.makedirs(os.path.dirname(path))
        with open(path, "wb") as fh:
            fh.write(VICTIM)
        yield path


def put(fs, path, data=b"PAR1"):
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    fs.pipe_file(path, data)


def layout(out, settings):
    """The filesystem, OUT's root, this run's staging folder and one file staged in it."""
    fs = filesystem(out, settings)
    root = strip_scheme(out)
    staging = f"{root}/_staging/{RUN}"
    put(fs, f"{staging}/0.parquet")
    return fs, root, staging, f"{staging}/0.parquet"


def forged(fs, staging, moves=(), removes=()):
    plan = {"run_id": RUN, "run_date": "2026-12-01", "moves": moves, "removes": removes}
    put(fs, f"{staging}/{commit.COMMIT}", json.dumps(plan).encode())


def plans(root, staging, staged, victim):
    """Forged plans, each with a step that reaches the victim."""
    up = posixpath.relpath(victim, staging)  # ../../../elsewhere/victim.parquet
    target = f"{root}/{DAY}/{RUN}-0.parquet"
    return {
        "moves a file from outside OUT into dt=": {"moves": [[victim, target]]},
        "moves a staged file over a file outside OUT": {"moves": [[staged, victim]]},
        "removes a file outside OUT": {"moves": [[staged, target]], "removes": [victim]},
        "moves through ..": {"moves": [[f"{staging}/{up}", target]]},
        "removes through ..": {"removes": [f"{root}/{DAY}/../{up}"]},
        "removes with a scheme": {"removes": [f"s3://{victim}"]},
    }


FORGERIES = [
    "moves a file from outside OUT into dt=",
    "moves a staged file over a file outside OUT",
    "removes a file outside OUT",
    "moves through ..",
    "removes through ..",
    "removes with a scheme",
]


def assert_refused(out, settings, done, caplog, victim):
    fs, root = filesystem(out, settings), strip_scheme(out)
    fs.invalidate_cache()
    assert fs.cat_file(victim) == VICTIM  # untouched
    assert len(done) == 1 and done[0].startswith(f"refused the commit plan of {RUN}: ")
    assert done[0].endswith(f"nothing moved or deleted, {root}/_staging/{RUN} left for inspection")
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warned == [f"meddx: {done[0]}"] and "\n" not in warned[0]
    assert not fs.exists(f"{root}/{DAY}")  # nothing committed
    assert fs.exists(f"{root}/_staging/{RUN}/0.parquet")  # the folder is left as it was
    assert fs.exists(f"{root}/_staging/{RUN}/{commit.COMMIT}")


@pytest.mark.parametrize("forgery", FORGERIES)
def test_a_forged_commit_plan_is_refused_and_touches_nothing(
    out, settings, victim, forgery, caplog
):
    fs, root, staging, staged = layout(out, settings)
    forged(fs, staging, **plans(root, staging, staged, victim)[forgery])
    with caplog.at_level(logging.WARNING, logger="meddx.store.commit"):
        done = commit.recover(out, settings)
    assert_refused(out, settings, done, caplog, victim)
    # Refused again by the next run: a forged plan never becomes trusted by waiting.
    assert commit.recover(out, settings) == done


def test_a_forged_plan_is_refused_whole(out, settings, victim, caplog):
    # Its first step is what commit() writes; its last one is not: no step is done.
    fs, root, staging, staged = layout(out, settings)
    partition = f"{root}/{DAY}"
    put(fs, f"{partition}/earlier-0.parquet")
    moves = [[staged, f"{partition}/{RUN}-0.parquet"]]
    forged(fs, staging, moves, removes=[f"{partition}/earlier-0.parquet", victim])
    with caplog.at_level(logging.WARNING, logger="meddx.store.commit"):
        done = commit.recover(out, settings)
    assert "removal" in done[0] and "is outside" in done[0]
    fs.invalidate_cache()
    assert fs.cat_file(victim) == VICTIM
    assert fs.exists(staged) and not fs.exists(f"{partition}/{RUN}-0.parquet")
    assert fs.exists(f"{partition}/earlier-0.parquet")


@pytest.mark.parametrize(
    "plan, why",
    [
        ({"run_id": "2026-12-01-another", "moves": []}, "it is not the plan of run"),
        ({"run_id": RUN, "run_date": "../..", "moves": []}, "is not YYYY-MM-DD"),
        ({"run_id": RUN, "moves": [["a", "b", "c"]]}, "is not a pair of paths"),
        ({"run_id": RUN, "moves": "everything"}, "are not lists"),
        ({"run_id": RUN, "removes": ["x.parquet"]}, "names no partition"),
    ],
)
def test_a_plan_not_of_the_protocols_shape_is_refused(tmp_path, plan, why):
    out = str(tmp_path / "results")
    with pytest.raises(commit.ForgedPlan, match=why):
        commit.check_plan(out, RUN, plan)


def test_a_plan_that_is_not_json_is_refused(tmp_path, settings, caplog):
    out = str(tmp_path / "results")
    fs, _, staging, staged = layout(out, settings)
    put(fs, f"{staging}/{commit.COMMIT}", b"\xff not json")
    with caplog.at_level(logging.WARNING, logger="meddx.store.commit"):
        done = commit.recover(out, settings)
    assert done[0].startswith(f"refused the commit plan of {RUN}: it is not JSON;")
    assert os.path.exists(staged)


def test_a_plan_through_a_symlinked_partition_is_refused(tmp_path, settings, caplog):
    # Lexically inside OUT, really elsewhere: dt= is a link to another folder, whose
    # Parquet files a "replace" would delete.
    out = str(tmp_path / "results")
    fs, root, staging, staged = layout(out, settings)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "victim.parquet").write_bytes(VICTIM)
    os.symlink(elsewhere, f"{root}/{DAY}")
    moves = [[staged, f"{root}/{DAY}/{RUN}-0.parquet"]]
    forged(fs, staging, moves, removes=[f"{root}/{DAY}/victim.parquet"])
    with caplog.at_level(logging.WARNING, logger="meddx.store.commit"):
        done = commit.recover(out, settings)
    assert "goes through a symlink" in done[0]
    assert sorted(p.name for p in elsewhere.iterdir()) == ["victim.parquet"]
    assert (elsewhere / "victim.parquet").read_bytes() == VICTIM


def test_a_symlinked_staging_folder_is_not_recovered(tmp_path, settings, caplog):
    # Every uncommitted folder under _staging is deleted by recovery: through a link,
    # that would be someone else's folders.
    out = tmp_path / "results"
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "projects").mkdir(parents=True)
    (elsewhere / "projects" / "thesis.tex").write_bytes(VICTIM)
    out.mkdir()
    os.symlink(elsewhere, out / "_staging")
    with caplog.at_level(logging.WARNING, logger="meddx.store.commit"):
        done = commit.recover(str(out), settings)
    assert done == [f"refused to recover {out}/_staging: it is a symlink; nothing moved or deleted"]
    assert (elsewhere / "projects" / "thesis.tex").read_bytes() == VICTIM
    assert [r.getMessage() for r in caplog.records] == [f"meddx: {done[0]}"]


def test_a_symlinked_staged_file_is_not_moved_into_results(tmp_path, settings):
    out = str(tmp_path / "results")
    fs, root, staging, _ = layout(out, settings)
    (tmp_path / "victim.parquet").write_bytes(VICTIM)
    os.symlink(tmp_path / "victim.parquet", f"{staging}/1.parquet")
    forged(fs, staging, [[f"{staging}/1.parquet", f"{root}/{DAY}/{RUN}-1.parquet"]])
    done = commit.recover(out, settings)
    assert "is a symlink" in done[0]
    assert not os.path.exists(f"{root}/{DAY}")
    assert (tmp_path / "victim.parquet").read_bytes() == VICTIM


def test_a_plan_written_by_commit_is_finished_by_recover(out, settings, monkeypatch):
    # The run is killed between writing its plan and finishing the moves: the next run
    # accepts the plan commit() wrote (replacing the partition's earlier file) and
    # finishes it.
    fs, root, staging, _ = layout(out, settings)
    put(fs, f"{staging}/1.parquet")
    put(fs, f"{root}/{DAY}/earlier-0.parquet")
    fenced = []

    class Killed(Exception):
        pass

    def killed(fs, plan):
        raise Killed

    monkeypatch.setattr(commit, "_move_all", killed)
    with pytest.raises(Killed):
        commit.commit(
            out, settings, RUN, "2026-12-01", fence=lambda: fenced.append(1), replace=True
        )
    assert fenced == [1]
    monkeypatch.undo()
    assert fs.exists(f"{staging}/{commit.COMMIT}")
    assert commit.recover(out, settings) == [f"finished commit of {RUN}"]
    fs.invalidate_cache()
    assert sorted(posixpath.basename(p) for p in fs.find(f"{root}/{DAY}")) == [
        f"{RUN}-0.parquet",
        f"{RUN}-1.parquet",
    ]
    assert not fs.exists(staging)


def test_a_refusing_fence_leaves_no_plan(out, settings):
    fs, root, staging, staged = layout(out, settings)

    def lost():
        raise MeddxError(f"run {RUN} stopped: its lease on OUT was taken over; nothing committed")

    with pytest.raises(MeddxError, match="taken over"):
        commit.commit(out, settings, RUN, "2026-12-01", fence=lost)
    fs.invalidate_cache()
    assert not fs.exists(f"{staging}/{commit.COMMIT}") and fs.exists(staged)
    assert not fs.exists(f"{root}/{DAY}")
