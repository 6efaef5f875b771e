"""Selection rules (meddx/imaging/rules.py): files, the decisions they make on real DICOM
headers, a run's skipped rows, and ``meddx rules check`` on a mixed folder."""

from __future__ import annotations

import io
import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pydicom
import pytest

from meddx import MeddxError
from meddx.imaging import rules
from meddx.imaging.decode import DecodeSettings, Skipped, decode_image
from meddx.inputs.storage import StorageSettings
from meddx.model import registry
from meddx.pipelines.dataset import selection_rules

from .helpers import MEDDX, session_env
from .images import dicom_cr, gradient

CORPUS = Path(pydicom.__file__).parent / "data" / "test_files"
SITE_RULES = """
[[exclude]]
name = "other site"
InstitutionName = ["Other Hospital"]

[[exclude]]
name = "secondary"
ImageType = ["SECONDARY"]

[[include]]
name = "chest"
BodyPartExamined = ["CHEST", ""]
Rows = {min = 32}
"""
SITE_RULES_YAML = """
exclude:
  - {name: other site, InstitutionName: [Other Hospital]}
  - {name: secondary, ImageType: SECONDARY}
include:
  - {name: chest, BodyPartExamined: [CHEST, ""], Rows: {min: 32}}
"""


def film(**attributes) -> bytes:
    """A 64 x 64 CR with ``attributes`` set on it."""
    ds = pydicom.dcmread(io.BytesIO(dicom_cr((gradient(64) * 4095).astype(np.uint16))))
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def header(data: bytes) -> pydicom.Dataset:
    return pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)


def test_toml_and_yaml_say_the_same_and_bad_files_are_one_line():
    toml, yaml = rules.loads(SITE_RULES, "site.toml"), rules.loads(SITE_RULES_YAML, "site.yaml")
    assert toml == yaml and len(toml.rules) == 3
    assert rules.parse(toml.as_data()) == toml  # what a checkpoint records reads back
    bad = {
        '[[include]]\nPatientName = ["X"]': "'PatientName' is not an attribute rules take",
        "[[include]]\nRows = {min = 5, max = 2}": "min is above max",
        "[[include]]\nRows = 5": "takes a range",
        '[[keep]]\nModality = ["CR"]': "unknown section 'keep'",
        '[[exclude]]\nname = "x"': "needs at least one condition",
        "[[exclude": "not valid rules",
    }
    for text, says in bad.items():
        with pytest.raises(MeddxError, match=re.escape(says)) as raised:
            rules.loads(text, "bad.toml")
        assert "\n" not in str(raised.value)


def test_the_rules_decide_on_the_header_and_name_the_rule_not_the_value():
    site = rules.loads(SITE_RULES, "site.toml")
    chest = film(BodyPartExamined="CHEST", InstitutionName="General")
    assert site.refused(header(chest)) is None
    assert site.refused(header(film())) is None  # no BodyPartExamined: "" is listed
    other = site.refused(header(film(InstitutionName="other hospital ")))
    assert other == 'rule "other site" (InstitutionName)'
    # ImageType has several values: one of them matching is enough.
    derived = site.refused(header(film(ImageType=["DERIVED", "SECONDARY"])))
    assert derived == 'rule "secondary" (ImageType)'
    belly = site.refused(header(film(BodyPartExamined="ABDOMEN")))
    assert belly == 'no include rule matches: "chest" (BodyPartExamined)' and "ABDOMEN" not in belly
    small = rules.loads('[[include]]\nname = "large"\nRows = {min = 1024}', "r.toml")
    assert small.refused(header(film())) == 'no include rule matches: "large" (Rows)'
    # The default rules: the detector's raw image and non-image objects are left out.
    raw = header(film(PresentationIntentType="FOR PROCESSING"))
    assert rules.DEFAULT.refused(raw) == 'rule "for processing" (PresentationIntentType)'
    report = header((CORPUS / "test-SR.dcm").read_bytes())
    assert rules.DEFAULT.refused(report) == 'rule "not an image" (SOPClassUID)'
    assert rules.DEFAULT.refused(header(film(PresentationIntentType="FOR PRESENTATION"))) is None


def test_decoding_skips_before_any_pixel_and_keeps_the_attributes():
    settings = DecodeSettings(size=32, rules=rules.loads(SITE_RULES, "site.toml"))
    with pytest.raises(Skipped) as raised:
        decode_image(film(BodyPartExamined="KNEE"), settings)
    assert raised.value.info["modality"] == "CR" and raised.value.info["study_pseudonym"] == ""
    pixels, _ = decode_image(film(BodyPartExamined="CHEST"), settings)
    assert pixels.shape == (32, 32)


def test_the_run_takes_its_rules_from_the_option_else_the_checkpoints(tmp_path):
    from meddx.config import ScoreConfig

    path = tmp_path / "site.toml"
    path.write_text(SITE_RULES)
    plain = registry.untrained_checkpoint("seednet", input_size=32)
    recorded = plain.replace(extra={**plain.extra, "rules": rules.loads(SITE_RULES, "s").as_data()})
    cfg = ScoreConfig(input=str(tmp_path), model="m.pt", out=str(tmp_path / "o"))
    assert selection_rules(cfg, (plain,)) == rules.DEFAULT
    assert selection_rules(cfg, (recorded,)) == rules.loads(SITE_RULES, "s")
    with pytest.raises(MeddxError, match="trained under different selection rules"):
        selection_rules(cfg, (plain, recorded))
    given = ScoreConfig(input=str(tmp_path), model="m.pt", out=str(tmp_path / "o"), rules=str(path))
    assert selection_rules(given, (plain, recorded)) == rules.loads(SITE_RULES, "s")
    missing = ScoreConfig(input="x", model="m.pt", out="o", rules=str(tmp_path / "none.toml"))
    with pytest.raises(MeddxError, match="rules file not found"):
        selection_rules(missing, (plain,))


def mixed_folder(folder: Path) -> dict[str, str]:
    """Films and objects a site's feed holds, and what the site's rules make of each."""
    folder.mkdir(parents=True, exist_ok=True)
    expected = {
        "chest.dcm": ("ok", None),
        "raw.dcm": ("skipped", 'rule "for processing" (PresentationIntentType)'),
        "other.dcm": ("skipped", 'rule "other site" (InstitutionName)'),
        "knee.dcm": ("skipped", 'no include rule matches: "chest" (BodyPartExamined)'),
        "report.dcm": ("skipped", 'rule "not an image" (SOPClassUID)'),
    }
    (folder / "chest.dcm").write_bytes(film(BodyPartExamined="CHEST"))
    (folder / "raw.dcm").write_bytes(film(PresentationIntentType="FOR PROCESSING"))
    (folder / "other.dcm").write_bytes(film(InstitutionName="Other Hospital"))
    (folder / "knee.dcm").write_bytes(film(BodyPartExamined="KNEE"))
    (folder / "report.dcm").write_bytes((CORPUS / "test-SR.dcm").read_bytes())
    return expected


def test_a_night_gives_skipped_rows_with_their_rule_and_no_alarm(ray_session, tmp_path):
    ckpt = tmp_path / "m.pt"
    registry.save_checkpoint(
        registry.untrained_checkpoint("seednet", input_size=64), str(ckpt), StorageSettings()
    )
    expected = mixed_folder(tmp_path / "feed")
    site = tmp_path / "site.toml"
    # The site's rules, and the default ones besides: a rule set replaces the default.
    site.write_text(SITE_RULES + DEFAULT_AS_TOML)
    out = tmp_path / "out"
    run = subprocess.run(
        [MEDDX, "screen", str(tmp_path / "feed"), "--model", str(ckpt), "--out", str(out),
         "--rules", str(site), "--max-error-rate", "0", "--quiet"],
        capture_output=True, text=True, env=session_env(ray_session), timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]  # skipped rows are no errors: no alarm
    assert "skipped=4 by the selection rules" in run.stdout
    assert "errors=0" in run.stdout
    files = list(out.glob("dt=*/*.parquet"))
    rows = pq.read_table(files).to_pylist()
    got = {Path(r["image_uri"]).name: (r["status"], r["error"]) for r in rows}
    assert got == expected
    # The rules are in the files' provenance.
    meta = pq.read_metadata(files[0]).metadata
    recorded = json.loads(meta[b"meddx.rules"])
    assert rules.parse(recorded) == rules.loads(SITE_RULES + DEFAULT_AS_TOML, "s")
    summary = json.loads(next(out.glob("_runs/dt=*/summary.json")).read_text())
    assert summary["skipped"] == 4 and summary["errors"] == 0


DEFAULT_AS_TOML = """
[[exclude]]
name = "for processing"
PresentationIntentType = ["FOR PROCESSING"]

[[exclude]]
name = "not an image"
SOPClassUID = ["1.2.840.10008.5.1.4.1.1.88.11", "1.2.840.10008.5.1.4.1.1.88.22",
               "1.2.840.10008.5.1.4.1.1.88.33"]
"""


def test_rules_check_tells_what_each_rule_keeps_and_drops(tmp_path):
    expected = mixed_folder(tmp_path / "feed")
    for path in sorted(CORPUS.glob("*.dcm"))[:30]:  # pydicom's own files besides
        (tmp_path / "feed" / f"corpus-{path.name}").write_bytes(path.read_bytes())
    (tmp_path / "feed" / "notes.txt").write_text("not an image")
    site = tmp_path / "site.toml"
    site.write_text(SITE_RULES + DEFAULT_AS_TOML)
    run = subprocess.run(
        [MEDDX, "rules", "check", str(site), str(tmp_path / "feed"), "--each"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    head = re.search(
        r"checked (\d+) of (\d+) inputs listed: kept (\d+), skipped (\d+), unreadable (\d+)",
        run.stdout,
    )
    checked, listed, kept, skipped, unreadable = map(int, head.groups())
    assert checked == listed and kept + skipped + unreadable == checked
    outcome = dict(line.split("\t") for line in run.stdout.splitlines() if "\t" in line)
    by_name = {Path(u).name: o for u, o in outcome.items()}
    for name, (status, reason) in expected.items():
        assert by_name[name] == ("kept" if status == "ok" else f"skipped: {reason}"), name
    matched = dict(re.findall(r"^  (.+?)\s+(?:include|exclude)\s+(\d+)$", run.stdout, re.M))
    assert int(matched["other site"]) >= 1 and int(matched["for processing"]) >= 1
    # A bad rules file: one line, no traceback.
    bad = tmp_path / "bad.toml"
    bad.write_text("[[include]]\nPatientID = ['1']\n")
    run = subprocess.run(
        [MEDDX, "rules", "check", str(bad), str(tmp_path / "feed")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode != 0 and "Traceback" not in run.stderr
    assert "'PatientID' is not an attribute rules take" in run.stderr
