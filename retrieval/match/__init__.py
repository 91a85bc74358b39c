"""Answering queries: nearest neighbours, visual words and geometric verification."""
