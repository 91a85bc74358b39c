"""The index database's tables (SQLAlchemy ORM) and the settings an index is created with."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from sqlalchemy import BigInteger, Float, Index, Integer, LargeBinary, String, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from .errors import IndexError_
from .metric import METRICS

SCHEMA_VERSION = 3  # 2: the `arrays` table (linear head); 3: per-face rows (images.face, images.box)
DB_NAME = "index.db"


# 64-bit on a database server (mtime_ns needs it; SQLite's INTEGER is 64-bit already, its DDL unchanged)
Int64 = Integer().with_variant(BigInteger(), "postgresql")


class Base(DeclarativeBase):
    pass


class SettingRow(Base):
    __tablename__ = "settings"
    key: Mapped[str] = mapped_column(String, primary_key=True)
    value: Mapped[str] = mapped_column(String)


class ImageRow(Base):
    """One indexed image. ``id`` is its FAISS id; ids are never reused (AUTOINCREMENT).

    In a faces index (``--preset faces``) a row is one face: ``face`` is its number in the photo (largest
    first) and ``box`` its ``x0,y0,x1,y1`` in the photo's pixels, so a photo has as many rows as faces;
    elsewhere both are NULL and a path has one row ((path, face) is unique either way). Both columns are
    deferred: a reader of a schema-2 index (no such columns before a writer upgrades it) never selects them.
    """

    __tablename__ = "images"
    __table_args__ = (Index("ux_images_path_face", "path", text("coalesce(face, -1)"), unique=True),
                      {"sqlite_autoincrement": True})
    id: Mapped[int] = mapped_column(Int64, primary_key=True, autoincrement=True)
    path: Mapped[str] = mapped_column(String, index=True)
    size: Mapped[int] = mapped_column(Int64)
    mtime_ns: Mapped[int] = mapped_column(Int64)
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    vector: Mapped[bytes] = mapped_column(LargeBinary)  # raw pooled embedding, float32
    indexed_at: Mapped[float] = mapped_column(Float)
    face: Mapped[int | None] = mapped_column(Integer, nullable=True, deferred=True)
    box: Mapped[str | None] = mapped_column(String, nullable=True, deferred=True)


class ArrayRow(Base):
    """Named float64 arrays fitted on the collection (the linear head)."""

    __tablename__ = "arrays"
    name: Mapped[str] = mapped_column(String, primary_key=True)
    shape: Mapped[str] = mapped_column(String)
    data: Mapped[bytes] = mapped_column(LargeBinary)


class SkippedRow(Base):
    """A file that could not be decoded; not retried until its size or mtime changes."""

    __tablename__ = "skipped"
    path: Mapped[str] = mapped_column(String, primary_key=True)
    size: Mapped[int] = mapped_column(Int64)
    mtime_ns: Mapped[int] = mapped_column(Int64)
    reason: Mapped[str] = mapped_column(String)


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
    head: dict = field(default_factory=dict)  # linear head config ({} = none); see retrieval/head.py
    pooling: str = "gap"  # feature map → embedding; see retrieval/pooling.py
    search: dict = field(default_factory=dict)  # search defaults of this index, e.g. {"verify": 60}; see PRESETS
    preset: str = ""  # the --preset it was created with ("" before schema 3 or without one); "faces": per-face rows
    faces: dict = field(default_factory=dict)  # faces index: detector, threshold (retrieval/presets.py FACES)
    precision: str = "fp32"  # the fast path's arithmetic, fp32 or int8 (retrieval/precision.py)

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise IndexError_(f"unknown metric {self.metric!r} ({' or '.join(METRICS)})")
