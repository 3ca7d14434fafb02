"""Data pipeline: JSONL records, image loading, validation, splitting, processing and collation.

Submodules are imported directly (`from vlmtune.data.records import read_records`); nothing heavy loads here.
"""
