"""Data layer: jsonl formats and validation (``formats``), the synthetic instruction world (``world``)."""
