"""The index on disk: settings, rows, vectors, the collection's statistics and checks."""
