"""Data pipeline: local files / save_to_disk / TFDS array_record sources, tokenisation, packing, resumable iterators.

    from jax_controlllm.data import DataConfig, make_data_iterator
    data = DataConfig.from_dict({"sources": ["corpus/*.jsonl"], "tokenizer": "runs/smollm2/hf"})
    it = make_data_iterator(data, None, global_batch_size=8, seq_len=512, seed=0)
    batch = next(it)           # input_ids, labels, segment_ids, positions: int32 [8, 512]
    state = it.get_state()     # JSON-serialisable; it.set_state(state) continues exactly

See docs/data.md.
"""
from jax_controlllm.config import DataConfig, SourceConfig
from jax_controlllm.data.errors import DataError
from jax_controlllm.data.iterator import DataIterator, make_data_iterator, make_eval_iterator
from jax_controlllm.data.pack import IGNORE_INDEX, pack_documents

__all__ = ["DataConfig", "SourceConfig", "DataError", "DataIterator", "make_data_iterator", "make_eval_iterator",
           "IGNORE_INDEX", "pack_documents"]
