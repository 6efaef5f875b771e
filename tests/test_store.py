"""The store of model-ready films (meddx prepare) on a real local Ray and a real S3
endpoint: decoded once, read by score, screen and train as if the source were."""

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from meddx import MeddxError
from meddx.config import PrepareConfig, ScoreConfig, ScreenConfig, SynthConfig
from meddx.inputs.storage import StorageSettings, filesystem
from meddx.pipelines.prepare import prepare
from meddx.pipelines.scoring import score
from meddx.pipelines.screening import screen
from meddx.store import films
from meddx.store.commit import read_results
from meddx.synthetic.chest import write_archive

from .images import broken_inputs, dicom_cr, make_tar, png

LOCAL = StorageSettings()


def archive(folder: Path) -> Path:
    """A small realistic mix (DICOM syntaxes, JPEG, 16-bit PNG), broken objects, a CT
    the chest model refuses, and a tar shard of two members."""
    write_archive(SynthConfig(out=str(folder), n=10, size=160, height=190, mix=True, seed=4))
    for name, data in broken_inputs().items():
        (folder / name).write_bytes(data)
    (folder / "ct.dcm").write_bytes(dicom_cr(modality="CT"))
    (folder / "cr.dcm").write_bytes(dicom_cr())
    shard = make_tar([("a.png", png(size=90)), ("b.png", png(size=70))])
    (folder / "pack.tar").write_bytes(shard)
    return folder


def rows_of(out: str, settings=LOCAL, columns=None):
    columns = columns or ["image_uri", "status", "error", "score", "content_sha256", "qc"]
    return read_results(out, settings, columns).sort_by("image_uri")


def test_prepare_then_score_the_store_as_the_source(ray_session, tmp_path, random_checkpoint):
    source = archive(tmp_path / "src")
    store = str(tmp_path / "store")
    first = prepare(PrepareConfig(input=str(source), out=store, size=96, quiet=True))
    inputs = 10 + len(broken_inputs()) + 2 + 1  # the shard's two members: two rows
    assert (first.inputs_seen, first.prepared, first.rows) == (inputs, inputs, inputs + 1)
    assert first.errors == len(broken_inputs())
    assert first.stored_bytes > 0
    marker = json.loads((tmp_path / "store" / films.STORE_FILE).read_text())
    assert marker["size"] == 96 and marker["decode_sha256"] == films.FilmSettings(96).sha256

    stored = pads.dataset(str(tmp_path / "store"), format="parquet", partitioning="hive")
    table = stored.to_table().sort_by("image_uri")
    ok = table.filter(pc.equal(table["status"], "ok"))
    assert (
        min(
            min(w, h)
            for w, h in zip(ok["width"].to_pylist(), ok["height"].to_pylist(), strict=True)
        )
        == 96
    )
    assert set(pc.unique(table["decode_sha256"]).to_pylist()) == {films.FilmSettings(96).sha256}
    meta = pq.read_schema(stored.files[0]).metadata
    assert json.loads(meta[b"meddx.store"])["size"] == 96
    for path in stored.files:  # no patient data in the store's files
        data = Path(path).read_bytes()
        assert b"Doe^Jane" not in data and b"MRN-0042" not in data

    again = prepare(PrepareConfig(input=str(source), out=store, size=96, quiet=True))
    assert (again.inputs_seen, again.prepared, again.rows) == (inputs, 0, 0)

    model, _ = random_checkpoint
    via = score(ScoreConfig(input=store, model=model, out=str(tmp_path / "via"), quiet=True))
    direct = score(ScoreConfig(input=str(source), model=model, out=str(tmp_path / "dir")))
    assert (
        (via.inputs, via.rows_written)
        == (direct.inputs, direct.rows_written)
        == (
            inputs,
            inputs + 1,
        )
    )
    a, b = rows_of(str(tmp_path / "via")), rows_of(str(tmp_path / "dir"))
    for column in ("image_uri", "status", "error", "content_sha256"):
        assert a[column].to_pylist() == b[column].to_pylist(), column
    assert "Modality CT is not one this model accepts" in " ".join(
        e or "" for e in a["error"].to_pylist()
    )
    both = pc.and_(pc.is_valid(a["score"]), pc.is_valid(b["score"]))
    diff = np.abs(np.array(a["score"].filter(both)) - np.array(b["score"].filter(both)))
    assert len(diff) == 13 and diff.max() < 0.02
    via_meta = pq.read_schema(next((tmp_path / "via").glob("dt=*/*.parquet"))).metadata
    dir_meta = pq.read_schema(next((tmp_path / "dir").glob("dt=*/*.parquet"))).metadata
    assert via_meta[b"meddx.store"] == store.encode()
    assert via_meta[b"meddx.store_decode_sha256"] == films.FilmSettings(96).sha256.encode()
    assert dir_meta[b"meddx.store"] == b""
    # explain reads the films from the store the run used: the sources may be gone.
    from meddx.analysis.explain import explain

    shutil.rmtree(source)
    day = next((tmp_path / "via").glob("dt=*"))
    written = explain(str(day), model, 3, str(tmp_path / "maps"), LOCAL)
    assert len(written) == 3 and all(Path(w).read_bytes().startswith(b"\x89PNG") for w in written)


def test_a_changed_source_is_decoded_again_never_served_stale(
    ray_session, tmp_path, random_checkpoint
):
    source = tmp_path / "src"
    source.mkdir()
    for i in range(4):
        (source / f"f{i}.png").write_bytes(png(size=80 + i))
    store = str(tmp_path / "store")
    prepare(PrepareConfig(input=str(source), out=store, size=64, quiet=True))
    # Touched, same bytes: read again, dropped by its hash, nothing added.
    later = os.stat(source / "f0.png").st_mtime + 60
    os.utime(source / "f0.png", (later, later))
    touched = prepare(PrepareConfig(input=str(source), out=store, size=64, quiet=True))
    assert (touched.prepared, touched.rows) == (1, 0)
    # Same name, new bytes: decoded again, and the store serves the new film.
    new = png(mode="L", size=120)
    (source / "f1.png").write_bytes(new)
    changed = prepare(PrepareConfig(input=str(source), out=store, size=64, quiet=True))
    # f1 decoded again; f0, touched, is read and dropped by its hash again (as a
    # screening night re-reads a touched input: its row still says the older mtime).
    assert (changed.prepared, changed.rows) == (2, 1)
    model, _ = random_checkpoint
    score(ScoreConfig(input=store, model=model, out=str(tmp_path / "out"), quiet=True))
    rows = rows_of(str(tmp_path / "out"))
    assert rows.num_rows == 4
    hashes = dict(
        zip(rows["image_uri"].to_pylist(), rows["content_sha256"].to_pylist(), strict=True)
    )
    assert hashes[str(source / "f1.png")] == hashlib.sha256(new).hexdigest()
    located = films.located(store, LOCAL)
    assert located.num_rows == 4  # one entry per input: the old film is not listed


def test_other_decode_settings_are_refused_never_mixed(ray_session, tmp_path, random_checkpoint):
    source = tmp_path / "src"
    source.mkdir()
    (source / "a.png").write_bytes(png(size=80))
    store = tmp_path / "store"
    prepare(PrepareConfig(input=str(source), out=str(store), size=48, quiet=True))
    before = sorted(p.name for p in store.glob("dt=*/*.parquet"))
    (source / "b.png").write_bytes(png(size=90))
    with pytest.raises(MeddxError, match="holds films made with size 48.*not size 64"):
        prepare(PrepareConfig(input=str(source), out=str(store), size=64, quiet=True))
    with pytest.raises(MeddxError, match="max pixels"):
        prepare(PrepareConfig(input=str(source), out=str(store), size=48, max_pixels=10**6))
    assert sorted(p.name for p in store.glob("dt=*/*.parquet")) == before
    model, _ = random_checkpoint  # 64 px: more than the store's 48
    with pytest.raises(MeddxError, match="48 px, smaller than the model's input"):
        score(ScoreConfig(input=str(store), model=model, out=str(tmp_path / "out")))
    # A store of another pseudonym key: its UIDs' pseudonyms would not match OUT's.
    os.environ["MEDDX_PSEUDONYM_KEY"] = "another-site-key-0123456789abcdef"
    try:
        with pytest.raises(MeddxError, match="prepare into another store"):
            prepare(PrepareConfig(input=str(source), out=str(store), size=48, quiet=True))
    finally:
        del os.environ["MEDDX_PSEUDONYM_KEY"]


def test_screen_writes_through_a_store_on_s3(ray_session, bucket, settings, triage_checkpoint):
    fs = filesystem(bucket, settings)
    incoming = f"{bucket.removeprefix('s3://')}/incoming"
    for i in range(5):
        fs.pipe_file(f"{incoming}/img-{i}.png", png(size=70 + i))
    fs.pipe_file(f"{incoming}/cr.dcm", dicom_cr())

    def night(day):
        cfg = ScreenConfig(
            input=f"{bucket}/incoming",
            model=triage_checkpoint,
            out=f"{bucket}/results",
            store=f"{bucket}/store",
            run_date=day,
            storage=settings,
            quiet=True,
        )
        return screen(cfg)

    first = night("2026-12-01")
    assert (first.inputs_seen, first.new_inputs, first.rows) == (6, 6, 6)
    assert films.located(f"{bucket}/store", settings).num_rows == 6
    for i in range(5, 8):
        fs.pipe_file(f"{incoming}/img-{i}.png", png(size=70 + i))
    second = night("2026-12-02")
    assert (second.inputs_seen, second.new_inputs, second.rows) == (9, 3, 3)
    stored = films.located(f"{bucket}/store", settings)
    assert stored.num_rows == 9
    results = read_results(f"{bucket}/results", settings, ["image_uri", "dt"])
    assert results.num_rows == 9 and len(set(results["image_uri"].to_pylist())) == 9
    files = fs.find(f"{bucket.removeprefix('s3://')}/results/dt=2026-12-02")
    with fs.open(files[0], "rb") as fh:
        assert pq.read_schema(fh).metadata[b"meddx.store"] == f"{bucket}/store".encode()
    # The studies' report and worklist are written as for any night.
    assert fs.exists(f"{bucket.removeprefix('s3://')}/results/_runs/dt=2026-12-02/report.html")


def test_prepare_cli_errors_are_one_line(tmp_path, capsys):
    from meddx.cli import main

    source = tmp_path / "src"
    source.mkdir()
    for argv, code, text in (
        (["prepare", str(source), "--out", str(tmp_path / "s"), "--size", "8"], 2, "--size"),
        (["prepare", str(source), "--out", str(tmp_path / "s"), "--sise", "64"], 2, "--sise"),
        (["prepare", str(tmp_path / "nope"), "--out", str(tmp_path / "s")], 1, "not found"),
    ):
        with pytest.raises(SystemExit) as exit:
            main(argv)
        err = capsys.readouterr().err
        assert exit.value.code == code and text in err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.slow
def test_train_reads_the_store_every_epoch(ray_session, tmp_path):
    from meddx.config import TrainConfig
    from meddx.pipelines.training import train

    def trained(data, out, **kw):
        small = {"model": "seednet", "workers": 1, "image_size": 64, "quiet": True}
        return train(TrainConfig(data=data, out=str(tmp_path / out), **small, **kw))

    source = tmp_path / "src"
    write_archive(SynthConfig(out=str(source), n=24, size=96, seed=2))
    store = str(tmp_path / "store")
    summary = trained(str(source), "m.pt", store=store, epochs=2)
    assert summary.n_train + summary.n_val == 24
    assert films.located(store, LOCAL).num_rows == 24  # decoded once, into the store
    # The store alone: labelled by its sources' class folders.
    shutil.rmtree(source)
    again = trained(store, "m2.pt", epochs=1)
    assert again.n_train + again.n_val == 24
