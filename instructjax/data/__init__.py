"""Data layer: jsonl formats and validation (``formats``), the synthetic instruction world (``world``, with its
tasks and gold score in ``world_tasks`` and its simulated writers in ``world_writers``)."""
