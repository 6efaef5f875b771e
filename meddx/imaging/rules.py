"""Which DICOM images a model scores: selection rules on their attributes, checked once
the header is parsed and before any pixel is decoded.

    # rules.toml (or the same as YAML)
    [[exclude]]
    name = "raw detector image"
    PresentationIntentType = ["FOR PROCESSING"]

    [[exclude]]
    name = "secondary capture"
    ImageType = ["SECONDARY"]

    [[include]]
    name = "chest films of the main sites"
    BodyPartExamined = ["CHEST", ""]     # "": the attribute missing or empty
    InstitutionName = ["St Elsewhere", "General"]
    Rows = {min = 1024}

An image is selected when no ``exclude`` rule matches it and, where there are
``include`` rules, one of them does. A rule matches when every condition it states
holds: a list of values holds when one of the attribute's values (ImageType has several)
is among them, compared without case or surrounding spaces; a range (``min``, ``max``)
holds when the number lies within. An attribute a file leaves out, or holds unreadable,
is "" to a list and fails a range.

A selected-out image still gets its row: ``status`` "skipped" and, as its error, the rule
and the attribute that decided (``rule "raw detector image" (PresentationIntentType)``),
never the value, which can be a site's or a station's name. Skipped rows are no errors:
evaluation, drift, the worklist and the error rate leave them out.

Rules are data (TOML or YAML), never code. ``DEFAULT`` holds what every run applies
unless a rule set replaces it: FOR PROCESSING images and non-image SOP classes are
excluded. The model's modalities (its checkpoint's, or ``--modalities``) stay a rule of
their own, "modality", and its views the ``wrong_view`` flag. ``train --rules FILE``
records a set in the checkpoint, which scoring then applies; ``score --rules FILE``
overrides it for a run.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass

from pydicom.dataset import Dataset

from meddx import MeddxError
from meddx.imaging.attributes import values

# The attributes a rule may name: lists of values, and numbers within a range.
LISTED = (
    "Modality",
    "SOPClassUID",
    "BodyPartExamined",
    "ViewPosition",
    "ImageType",
    "PresentationIntentType",
    "StationName",
    "InstitutionName",
    "Manufacturer",
    "ManufacturerModelName",
    "SeriesDescription",
)
RANGED = ("Rows", "Columns", "BitsStored", "NumberOfFrames")
ACTIONS = ("include", "exclude")
MAX_RULES = 200

# SOP classes that hold no image to score: structured reports, key objects, presentation
# states, segmentations, encapsulated documents, raw data, RT objects.
NOT_IMAGES = (
    "1.2.840.10008.5.1.4.1.1.88.11",  # Basic Text SR
    "1.2.840.10008.5.1.4.1.1.88.22",  # Enhanced SR
    "1.2.840.10008.5.1.4.1.1.88.33",  # Comprehensive SR
    "1.2.840.10008.5.1.4.1.1.88.34",  # Comprehensive 3D SR
    "1.2.840.10008.5.1.4.1.1.88.59",  # Key Object Selection
    "1.2.840.10008.5.1.4.1.1.11.1",  # Grayscale Softcopy Presentation State
    "1.2.840.10008.5.1.4.1.1.66.4",  # Segmentation
    "1.2.840.10008.5.1.4.1.1.104.1",  # Encapsulated PDF
    "1.2.840.10008.5.1.4.1.1.66",  # Raw Data
    "1.2.840.10008.5.1.4.1.1.481.5",  # RT Plan
)


@dataclass(frozen=True)
class Rule:
    name: str
    action: str  # "include" or "exclude"
    listed: tuple[tuple[str, frozenset[str]], ...] = ()  # (keyword, values folded)
    ranged: tuple[tuple[str, float, float], ...] = ()  # (keyword, low, high)

    def failing(self, ds: Dataset) -> str | None:
        """The first attribute whose condition ``ds`` fails, or None when all hold."""
        for keyword, wanted in self.listed:
            if not wanted & stated(ds, keyword):
                return keyword
        for keyword, low, high in self.ranged:
            number = numeric(ds, keyword)
            if number is None or not low <= number <= high:
                return keyword
        return None

    def as_data(self) -> dict:
        out: dict = {"name": self.name}
        out.update({k: sorted(v) for k, v in self.listed})
        for keyword, low, high in self.ranged:
            out[keyword] = {
                **({"min": low} if math.isfinite(low) else {}),
                **({"max": high} if math.isfinite(high) else {}),
            }
        return out


@dataclass(frozen=True)
class RuleSet:
    rules: tuple[Rule, ...] = ()

    def refused(self, ds: Dataset) -> str | None:
        """Why ``ds`` is selected out (the rule and the attribute), or None."""
        for rule in self.rules:
            if rule.action == "exclude" and rule.failing(ds) is None:
                decided = rule.listed[0][0] if rule.listed else rule.ranged[0][0]
                return f'rule "{rule.name}" ({decided})'
        includes = [r for r in self.rules if r.action == "include"]
        if not includes:
            return None
        failed = []
        for rule in includes:
            keyword = rule.failing(ds)
            if keyword is None:
                return None
            failed.append(f'"{rule.name}" ({keyword})')
        return f"no include rule matches: {', '.join(failed[:3])}"

    def as_data(self) -> dict:
        """The rules as TOML/YAML data: what ``parse`` reads back."""
        out: dict = {}
        for rule in self.rules:
            out.setdefault(rule.action, []).append(rule.as_data())
        return out

    def __bool__(self) -> bool:
        return bool(self.rules)


def stated(ds: Dataset, keyword: str) -> frozenset[str]:
    """The attribute's values, folded; {""} when missing, empty or unreadable."""
    try:
        found = values(ds, keyword)
    except Exception:  # noqa: BLE001 - an unreadable value is no value
        return frozenset({""})
    folded = frozenset(fold(v) for v in found)
    return folded or frozenset({""})


def numeric(ds: Dataset, keyword: str) -> float | None:
    try:
        found = values(ds, keyword)
        return float(found[0]) if len(found) == 1 else None
    except Exception:  # noqa: BLE001 - missing, text, multi-valued: no number
        return None


def fold(value) -> str:
    text = value.decode("latin-1", "replace") if isinstance(value, bytes) else str(value)
    return text.strip(" \x00").casefold()


def parse(data: dict, where: str = "the rules") -> RuleSet:
    """Rules from data (a TOML or YAML document, or a checkpoint's record); one line
    naming the rule and the key for anything it cannot take."""
    if not isinstance(data, dict):
        raise MeddxError(f"{where}: expected tables [[include]] and [[exclude]]")
    unknown = sorted(set(data) - set(ACTIONS))
    if unknown:
        raise MeddxError(f"{where}: unknown section {unknown[0]!r} (include, exclude)")
    rules = []
    for action in ACTIONS:
        entries = data.get(action, [])
        if not isinstance(entries, list):
            raise MeddxError(f"{where}: {action} must be a list of rules ([[{action}]])")
        for i, entry in enumerate(entries):
            rules.append(_rule(entry, action, f"{where}: {action} rule {i + 1}"))
    if len(rules) > MAX_RULES:
        raise MeddxError(f"{where}: at most {MAX_RULES} rules, got {len(rules)}")
    return RuleSet(tuple(rules))


def _rule(entry, action: str, where: str) -> Rule:
    if not isinstance(entry, dict):
        raise MeddxError(f"{where}: a rule is a table of attribute conditions")
    name = entry.get("name", where.rsplit(": ", 1)[-1])
    if not isinstance(name, str) or not name.strip() or len(name) > 80 or '"' in name:
        raise MeddxError(f"{where}: name must be a short text without quotes")
    listed, ranged = [], []
    for keyword, condition in entry.items():
        if keyword == "name":
            continue
        if keyword in LISTED:
            if isinstance(condition, str):
                condition = [condition]
            if not isinstance(condition, list) or not all(
                isinstance(v, str | int) for v in condition
            ):
                raise MeddxError(f"{where}: {keyword} takes a list of values")
            listed.append((keyword, frozenset(fold(v) for v in condition)))
        elif keyword in RANGED:
            ranged.append((keyword, *_range(condition, f"{where}: {keyword}")))
        else:
            raise MeddxError(
                f"{where}: {keyword!r} is not an attribute rules take "
                f"({', '.join(LISTED + RANGED)})"
            )
    if not listed and not ranged:
        raise MeddxError(f"{where}: a rule needs at least one condition")
    return Rule(name.strip(), action, tuple(listed), tuple(ranged))


def _range(condition, where: str) -> tuple[float, float]:
    if not isinstance(condition, dict) or not condition or set(condition) - {"min", "max"}:
        raise MeddxError(f"{where} takes a range: {{min = N, max = N}}")
    bounds = []
    for key, default in (("min", -math.inf), ("max", math.inf)):
        value = condition.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
            raise MeddxError(f"{where}: {key} must be a number")
        bounds.append(float(value))
    if bounds[0] > bounds[1]:
        raise MeddxError(f"{where}: min is above max")
    return bounds[0], bounds[1]


def loads(text: str, name: str) -> RuleSet:
    """A rules file's text: YAML when its name ends .yaml/.yml, else TOML."""
    try:
        if name.lower().endswith((".yaml", ".yml")):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = tomllib.loads(text)
    except Exception as exc:  # noqa: BLE001 - the parser's own words, one line
        raise MeddxError(f"{name}: not valid rules ({type(exc).__name__})") from None
    return parse(data, name)


DEFAULT = RuleSet(
    (
        Rule(
            "for processing",
            "exclude",
            (("PresentationIntentType", frozenset({"for processing"})),),
        ),
        Rule("not an image", "exclude", (("SOPClassUID", frozenset(NOT_IMAGES)),)),
    )
)
