"""The settings an index is created with, and the schema's version: no SQLAlchemy here, so that a plain
read (retrieval/index/store.py's light path) gets them without importing it. retrieval/index/schema.py
re-exports them beside the tables."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from retrieval.errors import IndexError_
from retrieval.metric import METRICS

SCHEMA_VERSION = 3  # 2: the `arrays` table (linear head); 3: per-face rows (images.face, images.box)
DB_NAME = "index.db"


@dataclass
class IndexSettings:
    """Fixed by the first run and recorded in the database, so search and explain use what indexing used."""

    model: str
    weights_id: str
    weights_source: str
    preprocess: dict
    metric: str  # "cosine" | "l2"
    dim: int
    index_type: str  # "flat" | "hnsw" | "ivfpq" | "custom"
    faiss_factory: str
    schema_version: int = SCHEMA_VERSION
    created_at: float = field(default_factory=time.time)
    explain: dict = field(default_factory=dict)  # how explanations are made; see default_explain()
    head: dict = field(default_factory=dict)  # linear head config ({} = none); see retrieval/index/head.py
    pooling: str = "gap"  # feature map → embedding; see retrieval/models/pooling.py
    search: dict = field(default_factory=dict)  # search defaults of this index, e.g. {"verify": 60}; see PRESETS
    preset: str = ""  # the --preset it was created with ("" before schema 3 or without one); "faces": per-face rows
    faces: dict = field(default_factory=dict)  # faces index: detector, threshold (retrieval/presets.py FACES)
    precision: str = "fp32"  # the fast path's arithmetic, fp32 or int8 (retrieval/models/precision.py)
    local: dict = field(default_factory=dict)  # local features: {"side", "budget"} ({} = retrieval/match/verify.py's
                                               # defaults, as every index before them recorded it); see local_options

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise IndexError_(f"unknown metric {self.metric!r} ({' or '.join(METRICS)})")


def default_index_dir() -> Path:
    """``$RETRIEVE_INDEX``, else the XDG data directory (``~/.local/share/retrieve``)."""
    env = os.environ.get("RETRIEVE_INDEX")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "retrieve"
