"""Token batches for scoring: documents cut into windows, right-padded to shape buckets."""
from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jax_controlllm.buckets import batch_bucket, length_bucket, pad_rows
from jax_controlllm.evaluate.readers import EvalInputError
from jax_controlllm.tokenizer import encode


def text_batches(tokenizer, texts: Sequence[str], seq_len: int = 512, batch_size: int = 8,
                 max_tokens: Optional[int] = None) -> list[dict]:
    """Documents -> {"input_ids", "attention_mask"} batches of at most [batch_size, seq_len]. Each document is
    tokenised (with the tokenizer's BOS, if it adds one) and cut into non-overlapping windows of ``seq_len``;
    windows are grouped by length and padded to buckets, so short documents do not pay for ``seq_len``."""
    windows, total = [], 0
    for text in texts:
        ids = encode(tokenizer, text)
        for start in range(0, len(ids), seq_len):
            window = ids[start:start + seq_len]
            if len(window) >= 2:                 # a lone token has nothing to predict
                windows.append(window)
                total += len(window)
        if max_tokens and total >= max_tokens:
            break
    if not windows:
        raise EvalInputError("no text to evaluate: every document is empty or a single token")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    windows.sort(key=len)                        # sums over tokens do not depend on the order
    batches = []
    for i in range(0, len(windows), batch_size):
        chunk = windows[i:i + batch_size]
        length = min(length_bucket(len(chunk[-1])), seq_len)
        ids, mask = pad_rows(chunk, batch_bucket(len(chunk), batch_size), pad, length=length)
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


def as_batch(batch) -> tuple[jax.Array, jax.Array]:
    if isinstance(batch, dict):
        ids = np.asarray(batch["input_ids"])
        mask = batch.get("attention_mask")
        mask = np.ones_like(ids) if mask is None else np.asarray(mask)
    else:
        ids = np.asarray(batch)
        mask = np.ones_like(ids)
    return jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32)


def progress_bar(items, progress: bool, desc: str, total: Optional[int] = None):
    if not progress:
        return items
    from tqdm.auto import tqdm
    return tqdm(items, desc=desc, total=total, leave=False)
