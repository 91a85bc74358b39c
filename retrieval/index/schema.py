"""The index database's tables (SQLAlchemy ORM) and the settings an index is created with."""
from __future__ import annotations

from sqlalchemy import BigInteger, Boolean, Float, Index, Integer, LargeBinary, String, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


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


class PersonRow(Base):
    """A person of a faces index (retrieval/curate/people.py): a name (NULL until someone gives one; unique), the
    centroid of its faces in the index's space (float32, L2-normalised) that later runs assign new faces by, and
    its representative face's row. Ids are never reused. Optional: an index without this table has no people yet
    (readers say so, the people writer creates it: IndexStore.ensure_tables)."""

    __tablename__ = "people"
    __table_args__ = {"sqlite_autoincrement": True}
    id: Mapped[int] = mapped_column(Int64, primary_key=True, autoincrement=True)
    name: Mapped[str | None] = mapped_column(String, nullable=True, unique=True)
    centroid: Mapped[bytes] = mapped_column(LargeBinary)
    face_row: Mapped[int | None] = mapped_column(Int64, nullable=True)
    created_at: Mapped[float] = mapped_column(Float)


class PersonFaceRow(Base):
    """A face row's person. ``manual``: a person put it there (move, merge), not the clustering. ``path``, ``box``
    and ``sha256`` repeat the face row's, so that when a re-indexed (or moved) photo's rows are replaced (new ids)
    the next update gives each new row the person of the old row at the same place of the same photo."""

    __tablename__ = "person_faces"
    row_id: Mapped[int] = mapped_column(Int64, primary_key=True, autoincrement=False)
    person_id: Mapped[int] = mapped_column(Int64, index=True)
    manual: Mapped[bool] = mapped_column(Boolean, default=False)
    path: Mapped[str] = mapped_column(String)
    box: Mapped[str | None] = mapped_column(String, nullable=True)
    sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
