"""Reading a public dataset as it comes: jsonl, json, parquet, or a ``datasets`` directory from ``save_to_disk``.

``read_splits(path)`` returns ``{split name: [Record, ...]}``; each ``Record`` keeps the file and the 1-based
record number it came from, so an adapter's error names both (``file:N: field 'f': ...``; for jsonl, N is
the line). The layouts read, without the ``datasets`` library:

- a file (``.jsonl``, ``.json`` holding an array of objects, ``.parquet``): one split, ``train``;
- a directory of such files, searched recursively: the split is the file name up to its first ``-`` or
  ``.`` (``train.jsonl``, ``data/test-00000-of-00001.parquet``), as the Hugging Face hub lays them out;
- a ``Dataset.save_to_disk`` directory (``state.json`` + Arrow stream files): one split, the name recorded in
  ``state.json`` or ``train``; a ``DatasetDict.save_to_disk`` directory (``dataset_dict.json``): its splits.

``assign_splits`` maps a dataset's split names onto the pipeline's train / valid / test (``validation``,
``valid``, ``val`` and ``dev`` are valid; any other name must be mapped explicitly), and carves a missing
valid or test split out of train with a seed.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import random
import re
from collections.abc import Mapping
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from instructjax.data.formats import DataError

FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".arrow")
ROLES = ("train", "valid", "test")
SPLIT_ALIASES = {
    "train": "train",
    "validation": "valid",
    "valid": "valid",
    "val": "valid",
    "dev": "valid",
    "test": "test",
}


@dataclasses.dataclass(frozen=True)
class Record:
    """One record of a public dataset, and where it came from (``path``, 1-based ``number``)."""

    path: str
    number: int
    data: Any

    def error(self, reason: str, message: str, field: str | None = None) -> DataError:
        return DataError(message, path=self.path, line=self.number, field=field, reason=reason)


def _read_jsonl(path: pathlib.Path) -> list[Record]:
    records = []
    with path.open("rb") as f:
        for number, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8").removeprefix("\ufeff")
            except UnicodeDecodeError as e:
                raise DataError(f"not UTF-8 ({e})", path=str(path), line=number, reason="not_utf8") from None
            try:
                records.append(Record(str(path), number, json.loads(text)))
            except json.JSONDecodeError as e:
                raise DataError(f"bad JSON ({e})", path=str(path), line=number, reason="bad_json") from None
    return records


def _read_json(path: pathlib.Path) -> list[Record]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"not a JSON document ({e})", path=str(path), reason="bad_json") from None
    if not isinstance(data, list):
        raise DataError("expected a JSON array of records", path=str(path), reason="not_array")
    return [Record(str(path), number, row) for number, row in enumerate(data, 1)]


def _read_arrow(path: pathlib.Path) -> list[Record]:
    try:
        table = pa.ipc.open_stream(str(path)).read_all()  # what datasets' save_to_disk writes
    except pa.ArrowInvalid:
        table = pa.ipc.open_file(str(path)).read_all()
    return [Record(str(path), number, row) for number, row in enumerate(table.to_pylist(), 1)]


def read_file(path: str | pathlib.Path) -> list[Record]:
    """Every record of one ``.jsonl``, ``.json``, ``.parquet`` or ``.arrow`` file, in order."""
    path = pathlib.Path(path)
    if path.suffix == ".jsonl":
        return _read_jsonl(path)
    if path.suffix == ".json":
        return _read_json(path)
    if path.suffix == ".parquet":
        table = pq.read_table(path)
        return [Record(str(path), number, row) for number, row in enumerate(table.to_pylist(), 1)]
    if path.suffix == ".arrow":
        return _read_arrow(path)
    raise ValueError(f"{path}: expected one of {', '.join(FILE_SUFFIXES)}")


def _saved_dataset(directory: pathlib.Path) -> list[Record]:
    state = json.loads((directory / "state.json").read_text())
    files = [directory / f["filename"] for f in state.get("_data_files", [])]
    if not files:
        raise ValueError(f"{directory / 'state.json'}: field '_data_files': no data files listed")
    return [record for f in files for record in _read_arrow(f)]


def read_splits(path: str | pathlib.Path) -> dict[str, list[Record]]:
    """``{split: records}`` of a file or directory in any layout of the module docstring."""
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    if path.is_file():
        return {"train": read_file(path)}
    if (path / "dataset_dict.json").is_file():  # DatasetDict.save_to_disk
        names = json.loads((path / "dataset_dict.json").read_text())["splits"]
        return {name: _saved_dataset(path / name) for name in names}
    if (path / "state.json").is_file():  # Dataset.save_to_disk
        name = json.loads((path / "state.json").read_text()).get("_split") or "train"
        return {name: _saved_dataset(path)}
    splits: dict[str, list[Record]] = {}
    files = sorted(f for f in path.rglob("*") if f.is_file() and f.suffix in FILE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"{path}: no {', '.join(FILE_SUFFIXES)} files in it")
    for f in files:
        name = re.split(r"[-.]", f.name, maxsplit=1)[0]
        splits.setdefault(name, []).extend(read_file(f))
    return splits


def assign_splits(
    splits: Mapping[str, list],
    *,
    mapping: Mapping[str, str] | None = None,
    seed: int = 0,
    valid_fraction: float = 0.05,
    test_fraction: float = 0.05,
) -> dict[str, list]:
    """The pipeline's ``train``/``valid``/``test`` from a dataset's splits.

    ``mapping`` names the dataset split of each role (``{"train": "train_prefs", "test": "test_prefs"}``);
    without it the names of ``SPLIT_ALIASES`` are used, and any other split name is an error (nothing is
    dropped silently). A role with no split is carved out of train: a seeded shuffle of train's records,
    ``valid_fraction`` (then ``test_fraction``) of them, at least one each."""
    if mapping:
        unknown = sorted(set(mapping) - set(ROLES))
        missing = sorted(set(mapping.values()) - set(splits))
        if unknown or missing:
            raise ValueError(f"split mapping {dict(mapping)}: roles {unknown} unknown / splits {missing} not found")
        roles = {role: list(splits[name]) for role, name in mapping.items()}
    else:
        unknown = sorted(set(splits) - set(SPLIT_ALIASES))
        if unknown:
            raise ValueError(
                f"splits {unknown} have no role: name them, e.g. --splits=train:{unknown[0]} (found {sorted(splits)})"
            )
        roles = {}
        for name, records in splits.items():
            role = SPLIT_ALIASES[name]
            if role in roles:
                raise ValueError(f"two splits map to {role!r}: pass --splits to choose (found {sorted(splits)})")
            roles[role] = list(records)
    if "train" not in roles:
        raise ValueError(f"no train split among {sorted(splits)}: pass --splits=train:NAME")
    missing_roles = [
        role for role, fraction in (("valid", valid_fraction), ("test", test_fraction)) if role not in roles
    ]
    if missing_roles:
        train = roles["train"]
        order = list(range(len(train)))
        random.Random(f"{seed}:splits").shuffle(order)  # string seed: the same split on every Python
        start = 0
        for role in missing_roles:
            n = max(1, round(len(train) * (valid_fraction if role == "valid" else test_fraction)))
            roles[role] = [train[i] for i in sorted(order[start : start + n])]
            start += n
        if start >= len(train):
            raise ValueError(f"train has {len(train)} records: too few to carve {missing_roles} out of it")
        kept = set(order[start:])
        roles["train"] = [r for i, r in enumerate(train) if i in kept]
    return {role: roles[role] for role in ROLES}
