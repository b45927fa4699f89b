"""Build a TFDS ``array_record`` dataset from local files, so one pipeline serves both kinds of source.

    prepare_tfds(["corpus/*.jsonl"], name="my_corpus", data_dir="~/tensorflow_datasets",
                 eval_fraction=0.01)
    # then: sources: [{name: my_corpus, data_dir: ~/tensorflow_datasets}], eval_split: validation

Records are read with the same readers as the pipeline (same parsing, same bad-record rules) and
written in input order (no shuffling), so the TFDS dataset yields the same documents in the same
order as the local files. Every field of the first record becomes a TFDS ``Text`` feature;
fields that are not strings (chat ``messages`` lists) are stored as JSON text, which the
pipeline decodes again. No TensorFlow is needed, to write or to read.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Optional

from jax_controlllm.config import DataConfig, SourceConfig
from jax_controlllm.data.errors import DataError
from jax_controlllm.data.sources import BadRecord, open_source
from jax_controlllm.data.stream import Concat, Holdout, holdout_every

EVAL_SPLIT = "validation"


def _examples(records, fields: dict[str, str], skip_bad: bool, counts: dict) -> Iterator[tuple[int, dict]]:
    for i in range(len(records)):
        record = records[i]
        if not isinstance(record, BadRecord):
            missing = [f for f in fields if f not in record.fields]
            if missing:
                record = BadRecord(record.where, f"has no field(s) {missing} (the first record has {sorted(fields)})")
        if isinstance(record, BadRecord):
            if not skip_bad:
                raise DataError(f"{record.where}: {record.reason}. Fix it or pass --skip-bad-records")
            counts["skipped"] += 1
            continue
        counts["written"] += 1
        yield i, {f: (record.fields[f] if kind == "text" else json.dumps(record.fields[f], ensure_ascii=False))
                  for f, kind in fields.items()}


def _field_kinds(records) -> dict[str, str]:
    """Field name -> "text" (strings) or "json" (anything else), from the first readable record."""
    for i in range(len(records)):
        record = records[i]
        if not isinstance(record, BadRecord):
            return {k: "text" if isinstance(v, str) else "json" for k, v in record.fields.items()}
    raise DataError("no readable record in the input; nothing to prepare")


def _builder(name: str, version: str, fields: dict[str, str], splits: dict, description: str, data_dir: str):
    import tensorflow_datasets as tfds

    class LocalFilesBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version(version)

        def _info(self):
            features = tfds.features.FeaturesDict({f: tfds.features.Text() for f in fields})
            return tfds.core.DatasetInfo(builder=self, description=description, features=features,
                                         disable_shuffling=True)   # keep the input order

        def _split_generators(self, dl_manager):
            return {split: self._generate_examples(examples) for split, examples in splits.items()}

        def _generate_examples(self, examples):
            yield from examples

    LocalFilesBuilder.name = name
    return LocalFilesBuilder(data_dir=data_dir, file_format="array_record")


def prepare_tfds(inputs: list, name: str, data_dir: str, version: str = "1.0.0", eval_fraction: float = 0.0,
                 data: Optional[DataConfig] = None, overwrite: bool = False) -> dict:
    """Write ``data_dir/name/version`` (splits ``train`` and, with ``eval_fraction``, ``validation``).

    ``inputs`` are globs or SourceConfig dicts of local files / save_to_disk directories; ``data``
    supplies reader settings (text_field for .txt, max_record_bytes, skip_bad_records). With
    ``eval_fraction`` the validation split is the same strided holdout that
    ``data.holdout_fraction`` takes from local files. Returns a summary with record counts.
    """
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        raise DataError(f"dataset name {name!r} must be snake_case (lowercase letters, digits, _), as TFDS requires")
    data = data or DataConfig()                 # reader settings only: the inputs are the sources
    sources = [s if isinstance(s, SourceConfig) else SourceConfig(**s) if isinstance(s, dict) else SourceConfig(path=s)
               for s in inputs]
    for i, source in enumerate(sources):
        source.validate(f"input[{i}]")
        if source.resolved_format() == "tfds":
            raise DataError(f"input[{i}] is already a TFDS dataset; prepare reads local files")
    records = Concat([open_source(s, data, s.split, i) for i, s in enumerate(sources)])
    if len(records) == 0:
        raise DataError(f"the input {[s.describe() for s in sources]} has no records")
    fields = _field_kinds(records)
    parts = {"train": records}
    if eval_fraction > 0:
        every = holdout_every(eval_fraction)
        parts = {"train": Holdout(records, every, eval_part=False), EVAL_SPLIT: Holdout(records, every, eval_part=True)}
    data_dir = os.path.expanduser(data_dir)
    target = Path(data_dir) / name / version
    if target.exists():
        if not overwrite:
            raise DataError(f"{target} already exists; pass --overwrite to rebuild it or choose another --version")
        shutil.rmtree(target)
    counts = {split: {"written": 0, "skipped": 0} for split in parts}
    splits = {split: _examples(part, fields, data.skip_bad_records, counts[split]) for split, part in parts.items()}
    description = f"Prepared by jax_controlllm from {', '.join(s.describe() for s in sources)}"
    builder = _builder(name, version, fields, splits, description, data_dir)
    with tempfile.TemporaryDirectory() as downloads:   # nothing is downloaded; keep data_dir clean
        builder.download_and_prepare(download_dir=downloads)
    return {"name": name, "version": version, "data_dir": data_dir, "path": str(target), "fields": fields,
            "splits": counts}
