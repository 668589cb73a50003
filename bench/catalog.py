"""The real model catalog of shared/traces/ollama_models.csv, as the benchmarks use it."""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

_HERE = Path(__file__).resolve().parent


def traces_dir() -> Path:
    """$OA_TRACES, else ../shared/traces beside the repo, else the copies in bench/data."""
    for candidate in (os.environ.get("OA_TRACES"), _HERE.parents[1] / "shared" / "traces"):
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    return _HERE / "data"


@dataclass(frozen=True)
class CatalogModel:
    name: str
    params_b: float
    quant: str
    file_bytes: int
    context: int


def load_catalog(path: Path | None = None) -> list[CatalogModel]:
    path = path or traces_dir() / "ollama_models.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; set OA_TRACES to the shared/traces folder")
    with path.open() as fh:
        return [
            CatalogModel(
                r["name"],
                float(r["params_b"]),
                r["quant"],
                int(r["file_size_bytes"]),
                int(r["context_length"]),
            )
            for r in csv.DictReader(fh)
        ]
