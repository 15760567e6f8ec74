"""Local jsonl files -> TFDS datasets in array_record format (no TensorFlow), read as random-access sources.

``build(kind, {"train": path, ...}, root)`` validates every line with ``formats.read_jsonl`` (errors name
file, line and field; ``skip_bad`` counts skips instead), writes the dataset under
``root/<kind>-<hash>`` where the hash covers the file contents, the kind and the skip policy, and returns
``{split: ArrayRecordDataSource}``. A changed file gets a new hash, so it is rebuilt; an unchanged one is
reused. Records come back as dicts of ``bytes`` (TFDS ``Text``); ``decode`` turns one into the
normalised row of ``formats.py``.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import io
import json
import pathlib
from collections.abc import Mapping
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from instructjax.data import formats

FORMAT_VERSION = "1"  # bump when the stored features change: every dataset is rebuilt

_TEXT_FIELDS = {"pretrain": ("text",), "demos": ("prompt", "completion"), "prompts": ("prompt",)}


def _features(kind: str) -> tfds.features.FeaturesDict:
    if kind == "comparisons":
        return tfds.features.FeaturesDict(
            {
                "prompt": tfds.features.Text(),
                "completions": tfds.features.Sequence(tfds.features.Text()),
                "ranking": tfds.features.Text(),  # tie groups as JSON: [[best...], [next...], ...]
            }
        )
    return tfds.features.FeaturesDict({f: tfds.features.Text() for f in _TEXT_FIELDS[kind]})


def _encode(row: dict, kind: str) -> dict:
    if kind == "comparisons":
        return {"prompt": row["prompt"], "completions": row["completions"], "ranking": json.dumps(row["ranking"])}
    return {f: row[f] for f in _TEXT_FIELDS[kind]}


def decode(record: Mapping[str, Any], kind: str) -> dict:
    """A stored record (bytes fields) back to the normalised row of ``formats.py``."""
    text = lambda v: v.decode("utf-8") if isinstance(v, bytes) else str(v)
    if kind == "comparisons":
        return {
            "prompt": text(record["prompt"]),
            "completions": [text(c) for c in np.asarray(record["completions"]).tolist()],
            "ranking": json.loads(text(record["ranking"])),
        }
    return {f: text(record[f]) for f in _TEXT_FIELDS[kind]}


class InstructJsonl(tfds.core.GeneratorBasedBuilder):
    """One dataset of one jsonl kind; each split is one local file."""

    VERSION = tfds.core.Version("1.0.0")

    def __init__(self, *, kind: str, splits: Mapping[str, str | pathlib.Path], skip_bad: bool = False, **kwargs):
        if kind not in formats.KINDS:
            raise ValueError(f"unknown data kind {kind!r}; expected one of {formats.KINDS}")
        self._kind, self._splits, self._skip_bad = kind, dict(splits), skip_bad
        self.reports: dict[str, formats.ReadReport] = {}
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, features=_features(self._kind), description=f"{self._kind} jsonl")

    def _split_generators(self, dl_manager):
        del dl_manager
        return {name: self._generate_examples(name, path) for name, path in self._splits.items()}

    def _generate_examples(self, split: str, path):
        rows, report = formats.read_jsonl(path, self._kind, skip_bad=self._skip_bad)
        self.reports[split] = report
        for i, row in enumerate(rows):
            yield i, _encode(row, self._kind)


def dataset_dir(
    kind: str, splits: Mapping[str, str | pathlib.Path], root: str | pathlib.Path, skip_bad: bool
) -> pathlib.Path:
    """``root/<kind>-<hash of the inputs>``: a changed input file lands in a new directory."""
    digest = hashlib.sha256(f"{FORMAT_VERSION}|{kind}|{skip_bad}".encode())
    for name in sorted(splits):
        digest.update(f"|{name}|".encode())
        with open(splits[name], "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return pathlib.Path(root) / f"{kind}-{digest.hexdigest()[:16]}"


def build(
    kind: str, splits: Mapping[str, str | pathlib.Path], root: str | pathlib.Path, skip_bad: bool = False
) -> dict[str, Any]:
    """Validate, build if needed, and open each split as a random-access data source.

    Multi-host: process 0 builds while the others wait, then every process opens the same files.
    """
    import jax  # deferred: data preparation should not need jax

    out_dir = dataset_dir(kind, splits, root, skip_bad)
    make_builder = functools.partial(
        InstructJsonl, kind=kind, splits=splits, skip_bad=skip_bad, data_dir=out_dir, file_format="array_record"
    )
    if jax.process_index() == 0:
        tfds.disable_progress_bar()  # our own progress display is the training bar
        # Independent runs on one machine (an ablation's worker processes) may build the same dataset at
        # once; unlocked, the second to finish failed renaming its copy onto the first's (FileExistsError).
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        with open(out_dir.parent / f"{out_dir.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            builder = make_builder()  # after the lock: it sees a build another process finished
            if not (pathlib.Path(builder.data_dir) / "dataset_info.json").exists():  # not built yet
                names = ", ".join(str(path) for path in splits.values())
                print(f"[data] {kind}: validating and converting {names} -> {out_dir}", flush=True)
            # TFDS announces a "download" of every dataset it prepares; these are local files, said above.
            with contextlib.redirect_stdout(io.StringIO()):
                builder.download_and_prepare()
        for split, report in builder.reports.items():
            if report.n_skipped:
                print(f"[data] {kind}/{split}: {report.summary()}")
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"tfds build {out_dir.name}")
        builder = make_builder()
    return {split: builder.as_data_source(split=split) for split in splits}
