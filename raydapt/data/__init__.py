"""Readers (jsonl / parquet / csv -> Ray Datasets), schema checks, rejects, splits, fingerprints."""
