"""Building and updating an index from folders of photos (``retrieve index``)."""
from .run import IndexReport, index_paths, repair_index
from retrieval.scan import FileEntry, scan_paths

__all__ = ["FileEntry", "IndexReport", "index_paths", "repair_index", "scan_paths"]
