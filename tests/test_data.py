"""The packaged drug reviews and the site split."""

import zipfile
from pathlib import Path

import pytest

from fedlora.data.drugreview import LABELS, SITES, load_split, site_of, split_by_site
from fedlora.errors import DataError


def test_splits_have_the_documented_sizes_and_labels():
    train, test = load_split("train"), load_split("test")
    assert (len(train), len(test)) == (600, 379)
    assert {r.label for r in train} == set(LABELS)
    assert not any("&#039;" in r.text or "&amp;" in r.text for r in train)  # entities decoded


def test_sites_partition_the_training_split_by_condition():
    train = load_split("train")
    sites = split_by_site(train)
    assert list(sites) == list(SITES)
    assert sum(len(v) for v in sites.values()) == len(train)
    assert all(len(v) > 0 for v in sites.values())
    assert site_of("Birth Control") == "reproductive"
    assert site_of("Bipolar Disorde") == "mental"  # truncated names in the source
    assert site_of("ibromyalgia") == "pain"
    assert site_of("Acne") == "dermatology"
    assert site_of("Diabetes, Type 2") == "other"


def test_missing_or_broken_data_file_names_the_file(tmp_path: Path):
    with pytest.raises(DataError, match="does not exist"):
        load_split("train", zip_path=tmp_path / "nope.zip")
    broken = tmp_path / "broken.zip"
    broken.write_text("not a zip")
    with pytest.raises(DataError, match="not a zip file"):
        load_split("train", zip_path=broken)
    wrong = tmp_path / "wrong.zip"
    with zipfile.ZipFile(wrong, "w") as zf:
        zf.writestr("drugsComTrain.tsv", "a\tb\n1\t2\n")
    with pytest.raises(DataError, match=r"wrong.zip:drugsComTrain.tsv:1: missing columns"):
        load_split("train", zip_path=wrong)
