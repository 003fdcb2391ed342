"""The inputs of `generate`: one module per kind (llava, jsonl, parquet, folder, webdataset) with its
listing and its reading, the registry that dispatches to them (kinds), what they share (records) and
the image bytes with path confinement (files)."""
