"""--pseudonymize-paths: file and tar member names (which often hold MRNs and accession
numbers) leave a run only as keyed hashes, in every row, error, worklist, report and
summary; the index still knows what was scored, and the path map is written only where
the operator says. A real screening run through the CLI on a real local Ray.
"""

from __future__ import annotations

import io
import tarfile

import pyarrow.dataset as pads
import pytest

from meddx.cli import main
from meddx.inputs.path_pseudonyms import PATH_PSEUDONYM, path_pseudonym

from .images import png
from .leaks import leaks_in_tree

KEY = "paths-key-3Qw8"
# Identifiers as archives put them in names: in a file name, a folder, a shard, a member.
NEEDLES = {"mrn": b"MRN4471", "accession": b"ACC90210"}


def _tar(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_paths_leave_a_night_only_as_pseudonyms(ray_session, tmp_path, triage_checkpoint, capsys):
    inputs, out, maps = tmp_path / "in", tmp_path / "out", tmp_path / "maps"
    (inputs / "MRN4471").mkdir(parents=True)
    (inputs / "MRN4471" / "chest-MRN4471.png").write_bytes(png("L", size=64))
    (inputs / "ACC90210.tar").write_bytes(
        _tar({"MRN4471-pa.png": png("L", size=64), "MRN4471-lat.png": png("RGB", size=64)})
    )
    (inputs / "broken-ACC90210.tar").write_bytes(b"not a tar at all" * 100)
    args = ["--model", triage_checkpoint, "--out", str(out), "--pseudonymize-paths"]
    args += ["--max-error-rate", "1"]  # the broken shard is meant

    with pytest.MonkeyPatch.context() as env:
        env.delenv("MEDDX_PSEUDONYM_KEY", raising=False)
        with pytest.raises(SystemExit) as refused:
            main(["screen", str(inputs), *args, "--run-date", "2026-03-01"])
    assert refused.value.code != 0 and not out.exists()
    assert (
        capsys.readouterr()
        .err.strip()
        .endswith(
            "--pseudonymize-paths needs the site's key: set MEDDX_PSEUDONYM_KEY or "
            "MEDDX_PSEUDONYM_KEY_FILE"
        )
    )

    with pytest.MonkeyPatch.context() as env:
        env.setenv("MEDDX_PSEUDONYM_KEY", KEY)
        main(["screen", str(inputs), *args, "--run-date", "2026-03-01", "--path-map", str(maps)])
        table = pads.dataset(str(out), format="parquet", partitioning="hive").to_table()
        rows = {r["image_uri"]: r for r in table.to_pylist()}
        assert len(rows) == 4
        assert all(uri.startswith(PATH_PSEUDONYM) for uri in rows)
        key = KEY.encode()
        shard = path_pseudonym(str(inputs / "ACC90210.tar"), key)
        assert rows[path_pseudonym(f"{inputs}/ACC90210.tar#MRN4471-pa.png", key)]["status"] == "ok"
        assert f"{shard}#" in path_pseudonym(f"{inputs}/ACC90210.tar#MRN4471-lat.png", key)
        broken = path_pseudonym(str(inputs / "broken-ACC90210.tar"), key)
        assert rows[broken]["status"] == "error" and broken in rows[broken]["error"]
        # Nothing under OUT (rows, metadata, worklist, report, summary, markers) holds a
        # name, and the map holds them only where --path-map put it.
        assert leaks_in_tree(out, NEEDLES) == []
        mapped = pads.dataset(str(maps), format="parquet").to_table().to_pylist()
        assert {m["image_uri"]: m["path"] for m in mapped} == {
            path_pseudonym(p, key): p
            for p in (
                str(inputs / "MRN4471" / "chest-MRN4471.png"),
                str(inputs / "ACC90210.tar"),
                str(inputs / "broken-ACC90210.tar"),
            )
        }
        # The next night knows every input by its pseudonym: only the unreadable shard,
        # which has no content hash, is tried again (as without pseudonyms).
        main(["screen", str(inputs), *args, "--run-date", "2026-03-02"])
    again = pads.dataset(str(out), format="parquet", partitioning="hive").to_table()
    second = [r["image_uri"] for r in again.to_pylist() if r["dt"] == "2026-03-02"]
    assert second == [broken] and again.num_rows == 5
    assert leaks_in_tree(out, NEEDLES) == []
