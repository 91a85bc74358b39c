"""Curating a collection: near-duplicate groups (duplicates.py, moves.py) and people in a faces index (clustering.py,
people.py). Built on the index, verification and the faces preset; nothing below this package imports it."""
