"""Logit lens: decode the residual stream after every block with the final norm and unembedding, and read
off the target token's probability and rank at the last real position. Shows at which depth a fact
becomes readable, and how that depth moves across training checkpoints."""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from jax_controlllm.circuits.attribute import matmul_precision, plain_run
from jax_controlllm.circuits.batching import chunks, prepare
from jax_controlllm.circuits.nodes import circuit_model, final_logits, last_position
from jax_controlllm.config import ModelConfig


@dataclass
class LogitLens:
    probability: np.ndarray          # [N, L] target probability after each block
    rank: np.ndarray                 # [N, L] target rank (0 = top) after each block

    def summary(self) -> dict:
        return {"mean_probability": self.probability.mean(0).tolist(), "mean_rank": self.rank.mean(0).tolist(),
                "top1_fraction": (self.rank == 0).mean(0).tolist()}


@partial(jax.jit, static_argnames=("config",))
def _lens_step(config: ModelConfig, weights: dict, ids, last, target):
    out = plain_run(config, weights, ids)
    probs, ranks = [], []
    for resid in out.block_inputs[1:] + [out.resid]:
        logits = final_logits(config, weights, last_position(resid, last))
        at_target = jnp.take_along_axis(logits, target[:, None], axis=1)
        probs.append(jnp.exp(at_target[:, 0] - jax.nn.logsumexp(logits, axis=1)))
        ranks.append(jnp.sum(logits > at_target, axis=1))
    return jnp.stack(probs, 1), jnp.stack(ranks, 1)


def logit_lens(config, params, ids, target_ids, lengths=None, batch_size: int = 16,
               dtype: str = "float32") -> LogitLens:
    """Target probability and rank after each block for right-padded prompts ``ids`` [N, T]."""
    model = circuit_model(config, params, dtype)
    prompts = prepare(ids, None, target_ids, None, lengths, model.config.vocab_size)
    n, layers = prompts.n_items, model.config.num_hidden_layers
    probability, rank = np.zeros((n, layers)), np.zeros((n, layers), np.int64)
    with matmul_precision(dtype):
        for chunk in chunks(prompts, np.ones(n), batch_size):
            p, r = _lens_step(model.config, model.weights, chunk["clean"], chunk["last"], chunk["labels"][:, 0])
            items = chunk["items"]
            probability[items], rank[items] = np.asarray(p)[:len(items)], np.asarray(r)[:len(items)]
    return LogitLens(probability, rank)
