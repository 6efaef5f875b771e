"""``meddx rules check FILE INPUT``: what a rule set would keep and drop of INPUT, on a
sample, before a night depends on it.

Each sampled input is read and its DICOM header parsed (no pixel is decoded); every rule
is matched against it, and the set decides as a run would. An input that is no DICOM
(PNG, JPEG) has no attributes for the rules: it is kept, as a run keeps it. An input
that cannot be read or parsed is counted as such: a run would give it an error row.
"""

from __future__ import annotations

import itertools
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

from meddx import secret
from meddx.imaging import dicom
from meddx.imaging.decode import sniff
from meddx.imaging.rules import RuleSet
from meddx.inputs import dicomweb, listing, reading, shards
from meddx.inputs.storage import StorageSettings

DEFAULT_SAMPLE = 200


@dataclass
class Checked:
    sampled: int = 0
    listed: int = 0
    kept: int = 0
    skipped: int = 0
    not_dicom: int = 0
    unreadable: int = 0
    matched: Counter = field(default_factory=Counter)  # rule name -> inputs it matched
    reasons: Counter = field(default_factory=Counter)  # why inputs were skipped
    outcomes: list[tuple[str, str]] = field(default_factory=list)  # (image_uri, outcome)


def check(
    rules: RuleSet,
    input_uri: str,
    settings: StorageSettings,
    sample: int = DEFAULT_SAMPLE,
    seed: int | None = None,
    max_bytes: int = reading.DEFAULT_MAX_OBJECT_BYTES,
) -> Checked:
    """Match ``rules`` against a sample of INPUT: the first ``sample`` inputs listed, or
    with ``seed`` a random sample of them."""
    listed, located = listing.list_located(input_uri, settings, secret.pseudonym_key())
    uris = listed.table()["image_uri"].to_pylist()
    out = Checked(listed=len(uris))
    chosen = (
        sorted(random.Random(seed).sample(uris, min(sample, len(uris))))
        if seed is not None
        else uris[:sample]
    )
    locators = dicomweb.locators_of(located, chosen) if located is not None else None
    for uri, data, error in itertools.islice(read(chosen, settings, max_bytes, locators), sample):
        out.sampled += 1
        if error or not data:
            out.unreadable += 1
            out.outcomes.append((uri, "unreadable"))
            continue
        if sniff(data[:132]) != "dicom":
            out.not_dicom += 1
            out.kept += 1
            out.outcomes.append((uri, "kept (no DICOM attributes)"))
            continue
        try:
            with dicom.silenced():
                ds = dicom.parse(data)
        except Exception:  # noqa: BLE001 - a run gives it an error row
            out.unreadable += 1
            out.outcomes.append((uri, "unreadable"))
            continue
        for rule in rules.rules:
            if rule.failing(ds) is None:
                out.matched[rule.name] += 1
        reason = rules.refused(ds)
        if reason:
            out.skipped += 1
            out.reasons[reason] += 1
            out.outcomes.append((uri, f"skipped: {reason}"))
        else:
            out.kept += 1
            out.outcomes.append((uri, "kept"))
    return out


def read(uris: list[str], settings, max_bytes: int, locators) -> Iterator[tuple[str, bytes, str]]:
    """(image_uri, bytes, error) of each input, a tar shard's members one by one."""
    loose = [u for u in uris if not shards.is_shard(u)]
    found = dict(zip(loose, reading.read_uris(loose, settings, max_bytes, locators), strict=True))
    for uri in uris:
        if shards.is_shard(uri):
            yield from shards.read_shard(uri, settings, max_bytes)
        else:
            yield (uri, *found[uri])
