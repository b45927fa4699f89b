"""DataConfig: what the data pipeline reads, how it tokenises, packs, shuffles and holds out eval data.

The run config (``jax_controlllm.config.RunConfig``) keeps ``data`` as a plain dict; the training
loop turns it into a ``DataConfig`` with ``DataConfig.from_dict``. Unknown keys are errors that
name the key and suggest the closest valid one (``jax_controlllm.config.from_dict``).

A YAML example (a 3:1 mixture of local JSONL and a prepared TFDS dataset)::

    data:
      mode: pretrain
      tokenizer: runs/smollm2/hf
      sources:
        - {path: "corpus/*.jsonl", weight: 3}
        - {name: my_corpus, data_dir: ~/tensorflow_datasets, weight: 1}
      holdout_fraction: 0.01
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from jax_controlllm.config import ConfigError, from_dict

MODES = ("pretrain", "sft")
FORMATS = ("auto", "jsonl", "parquet", "text", "hf_disk", "tfds")
TEXT_UNITS = ("line", "file")
SHARD_BY = ("rows", "documents")


@dataclass
class SourceConfig:
    """One dataset of the mixture: local files by glob, a ``save_to_disk`` directory, or a TFDS name."""
    path: Optional[str] = None           # glob of .jsonl/.parquet/.txt files, or a save_to_disk directory
    name: Optional[str] = None           # TFDS dataset name ("my_corpus", "my_corpus/config:1.0.0")
    format: str = "auto"                 # auto: tfds if `name`, else by file suffix / directory layout
    data_dir: Optional[str] = None       # TFDS data_dir holding the prepared array_record dataset
    split: str = "train"                 # split of TFDS / save_to_disk DatasetDict sources
    eval_split: Optional[str] = None     # held-out split of this source (overrides DataConfig.eval_split)
    weight: float = 1.0                  # relative sampling weight in the mixture
    text_unit: str = "line"              # plain-text files: one document per line, or per file
    text_field: Optional[str] = None     # per-source overrides of the DataConfig field names
    messages_field: Optional[str] = None

    def resolved_format(self) -> str:
        if self.format != "auto":
            return self.format
        if self.name is not None:
            return "tfds"
        path = (self.path or "").rstrip("/")
        for suffix, fmt in ((".jsonl", "jsonl"), (".parquet", "parquet"), (".txt", "text"), (".text", "text")):
            if path.endswith(suffix):
                return fmt
        return "hf_disk"   # a directory without a file suffix: Hugging Face `save_to_disk`

    def describe(self) -> str:
        return f"tfds:{self.name}" if self.name is not None else str(self.path)

    def validate(self, where: str) -> None:
        if (self.path is None) == (self.name is None):
            raise ConfigError(f"{where}: set exactly one of 'path' (local files or a save_to_disk "
                              f"directory) and 'name' (a TFDS dataset)")
        _one_of(self.format, FORMATS, f"{where}.format")
        _one_of(self.text_unit, TEXT_UNITS, f"{where}.text_unit")
        if self.path is not None and self.resolved_format() == "tfds":
            raise ConfigError(f"{where}: format tfds reads a dataset by 'name' (with 'data_dir'), not by 'path'")
        if self.path is not None and self.path.endswith(".gz"):
            raise ConfigError(f"{where}.path: compressed files are not supported; decompress "
                              f"{self.path!r} first (random access needs plain files)")
        if self.eval_split is not None and self.resolved_format() not in ("tfds", "hf_disk"):
            raise ConfigError(f"{where}.eval_split: only TFDS and save_to_disk sources have splits; hold out "
                              f"part of local files with data.holdout_fraction, or list them in data.eval_sources")
        if not self.weight > 0:
            raise ConfigError(f"{where}.weight: must be > 0, got {self.weight}")


@dataclass
class DataConfig:
    """The data pipeline's settings; see docs/data.md for what each one does."""
    sources: list = field(default_factory=list)      # SourceConfig entries (a string is a path)
    mode: str = "pretrain"                           # pretrain: text documents | sft: chat conversations
    packing: bool = True                             # pack several documents per row (segment ids)
    shuffle: bool = True                             # shuffle each source, reshuffled every epoch
    shard_by: str = "rows"                           # rows: global row stream | documents: per-process docs
    text_field: str = "text"
    messages_field: str = "messages"                 # SFT: list of {role, content}
    prompt_field: str = "prompt"                     # SFT without messages: a single prompt/response turn
    response_field: str = "response"
    tokenizer: Optional[str] = None                  # HF tokenizer directory (if not passed in code)
    add_bos: Optional[bool] = None                   # None: as the tokenizer does by default (model family)
    add_eos: Optional[bool] = None                   # None: pretrain ends each document, sft relies on the template
    doc_end_token: Optional[str] = None              # None: <|end_of_text|>, <|endoftext|> or the EOS token
    skip_bad_records: bool = False                   # skip and count malformed records instead of failing
    max_record_bytes: int = 16 * 1024 * 1024         # longer lines/records are bad records
    holdout_fraction: float = 0.0                    # eval = every round(1/f)-th record of sources without eval split
    eval_split: Optional[str] = None                 # eval split for TFDS / save_to_disk sources
    eval_sources: list = field(default_factory=list) # separate eval data (SourceConfig entries); overrides both
    tokenize_chunk: int = 128                        # documents tokenised per call (speed only)
    prefetch: int = 2                                # batches prepared ahead by a thread (0: none)

    @classmethod
    def from_dict(cls, data: dict, where: str = "data") -> "DataConfig":
        """Build and validate from a plain dict; unknown keys raise ConfigError with a suggestion."""
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
        data = dict(data)
        raw_sources = data.pop("sources", [])
        raw_eval_sources = data.pop("eval_sources", [])
        config = from_dict(cls, data, where)     # the scalar fields, with typo suggestions
        config.sources = _sources_from(raw_sources, f"{where}.sources")
        config.eval_sources = _sources_from(raw_eval_sources, f"{where}.eval_sources")
        config.validate(where)
        return config

    def validate(self, where: str = "data") -> None:
        if not self.sources:
            raise ConfigError(f"{where}.sources: no data sources; add e.g. "
                              f"sources: [{{path: 'corpus/*.jsonl'}}] or [{{name: my_tfds_dataset, data_dir: ...}}]")
        self.sources = _sources_from(self.sources, f"{where}.sources")
        self.eval_sources = _sources_from(self.eval_sources, f"{where}.eval_sources")
        for kind in ("sources", "eval_sources"):
            for i, source in enumerate(getattr(self, kind)):
                source.validate(f"{where}.{kind}[{i}]")
        _one_of(self.mode, MODES, f"{where}.mode")
        _one_of(self.shard_by, SHARD_BY, f"{where}.shard_by")
        if not 0.0 <= self.holdout_fraction < 0.5:
            raise ConfigError(f"{where}.holdout_fraction: must be in [0, 0.5), got {self.holdout_fraction}")
        if self.max_record_bytes < 1:
            raise ConfigError(f"{where}.max_record_bytes: must be positive, got {self.max_record_bytes}")
        if self.prefetch < 0:
            raise ConfigError(f"{where}.prefetch: must be >= 0, got {self.prefetch}")
        if self.tokenize_chunk < 1:
            raise ConfigError(f"{where}.tokenize_chunk: must be positive, got {self.tokenize_chunk}")

    def text_field_of(self, source: SourceConfig) -> str:
        return source.text_field or self.text_field

    def messages_field_of(self, source: SourceConfig) -> str:
        return source.messages_field or self.messages_field


def _sources_from(items, where: str) -> list:
    if isinstance(items, (str, dict, SourceConfig)):
        items = [items]
    if not isinstance(items, list):
        raise ConfigError(f"{where}: expected a list, got {type(items).__name__}")
    return [_source_from(item, f"{where}[{i}]") for i, item in enumerate(items)]


def _source_from(item, where: str) -> SourceConfig:
    if isinstance(item, SourceConfig):
        return item
    if isinstance(item, str):
        return SourceConfig(path=item)
    return from_dict(SourceConfig, item, where)


def _one_of(value: str, choices: tuple, where: str) -> None:
    if value not in choices:
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(choices)}")
