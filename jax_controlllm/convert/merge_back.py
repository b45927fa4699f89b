"""Merge-back export: fold each controlled layer's two weight sets into one plain Llama layer (spec §5).

    lerp:                  W = W_p + t (W_e - W_p),  t = sigmoid(f)            (element-wise)
    slerp, dlerp, dlerpin: each row of the [out, in] matrix slerped with t = sigmoid(f) or sigmoid(b)

This is a weight-space merge, so the merged model is a *different function*; ``merge_back`` reports how far
its logits move on a sample. It is a transform of the model applied before serialising: ``save_merged_hf``
merges, then hands the merged tensors to the HF serialiser (the model is converted to HF tensors once).
moe / proj / prog have no faithful fold and are refused. Hybrid models,
whose merge-back crashes in the release, merge here: controlled layers fold, inserted layers stay.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from jax_controlllm.config import ConfigError, ModelConfig, to_dict
from jax_controlllm.convert.hf import MERGED_MARKER, from_hf_tensors, save_hf_tensors, to_hf_tensors
from jax_controlllm.model import forward
from jax_controlllm.model.layout import layer_plan

FOLDABLE = ("lerp", "slerp", "dlerp", "dlerpin")     # merge methods with a weight-space fold
SAMPLE_TOKENS = 64                                    # default drift sample: 2 rows of this many random tokens


def _sigmoid(x) -> float:
    return float(1.0 / (1.0 + np.exp(-np.float64(np.asarray(x).reshape(-1)[0]))))


def slerp_rows(w_p: np.ndarray, w_e: np.ndarray, t: float) -> np.ndarray:
    """The release's row rule: rows normalised, c clamped to ±(1 - 1e-6), s = sin(theta) + 1e-6."""
    p2, e2 = np.atleast_2d(w_p).astype(np.float32), np.atleast_2d(w_e).astype(np.float32)
    n_p = p2 / np.linalg.norm(p2, axis=-1, keepdims=True)
    n_e = e2 / np.linalg.norm(e2, axis=-1, keepdims=True)
    c = np.clip(np.sum(n_p * n_e, axis=-1, keepdims=True), -1 + 1e-6, 1 - 1e-6)
    theta = np.arccos(c)
    s = np.sin(theta) + 1e-6
    out = np.sin((1 - t) * theta) / s * p2 + np.sin(t * theta) / s * e2
    return out.reshape(w_p.shape).astype(w_p.dtype)


def merge_weight_t(config: ModelConfig, tensors: dict, index: int) -> float:
    method = config.expansion.merge_method
    if method in ("lerp", "slerp"):
        return _sigmoid(tensors[f"model.layers.{index}.interpolation_factor"])
    return _sigmoid(tensors[f"model.layers.{index}.interp_weight.fc.bias"])


def merged_config(config: ModelConfig) -> ModelConfig:
    exp = config.expansion
    if exp is None:
        raise ConfigError("merge_back: the model is not expanded; export it as a plain Llama instead")
    if exp.merge_method not in FOLDABLE:
        raise ConfigError(f"merge_back: merge_method {exp.merge_method!r} has no weight-space fold (supported: "
                          f"{', '.join(FOLDABLE)}); export the release format (CausalLMExpansion) instead")
    if exp.interpolation_norm_alpha != 0:
        raise ConfigError("merge_back: the relaxed norm (interpolation_norm_alpha != 0) cannot be expressed in a "
                          "plain Llama; export the release format instead")
    return dataclasses.replace(config, expansion=None, trainable_layers=None)


def merge_back_tensors(config: ModelConfig, tensors: dict) -> dict:
    """HF tensors of the expanded model -> HF tensors of the merged plain Llama (same block indices)."""
    method = config.expansion.merge_method
    out = {k: v for k, v in tensors.items() if not k.startswith("model.layers.")}
    for index, block in enumerate(layer_plan(config)):
        prefix = f"model.layers.{index}."
        if block.kind == "llama":
            out.update({k: v for k, v in tensors.items() if k.startswith(prefix)})
            continue
        t = merge_weight_t(config, tensors, index)
        for name in (k[len(prefix) + len("pretrained_layer."):] for k in tensors
                     if k.startswith(prefix + "pretrained_layer.")):
            w_p = tensors[f"{prefix}pretrained_layer.{name}"]
            w_e = tensors[f"{prefix}expanded_layer.{name}"]
            out[prefix + name] = (w_p + t * (w_e - w_p)).astype(w_p.dtype) if method == "lerp" \
                else slerp_rows(w_p, w_e, t)
    return out


@dataclass(frozen=True)
class MergedBack:
    config: ModelConfig          # the plain Llama
    params: dict                 # its parameters
    tensors: dict                # the same as HF tensors, ready to serialise
    report: dict                 # merge method, merged layers, their t, and the logit drift on a sample


def merge_back(config: ModelConfig, params: dict, sample_ids=None, seed: int = 0) -> MergedBack:
    """Fold every controlled layer into a plain layer and measure how far the logits move on ``sample_ids``
    (default: 2 random rows)."""
    plain = merged_config(config)
    tensors = to_hf_tensors(config, params)
    merged_tensors = merge_back_tensors(config, tensors)
    merged = from_hf_tensors(plain, merged_tensors)
    if sample_ids is None:
        rng = np.random.default_rng(seed)
        sample_ids = rng.integers(0, config.vocab_size, size=(2, min(SAMPLE_TOKENS, config.max_position_embeddings)))
    before = np.asarray(forward(config, params, sample_ids))
    after = np.asarray(forward(plain, merged, sample_ids))
    drift = np.abs(after - before)
    controlled = [i for i, b in enumerate(layer_plan(config)) if b.kind == "controlled"]
    report = {"merge_method": config.expansion.merge_method, "merged_layers": controlled,
              "merge_weights_t": {i: merge_weight_t(config, tensors, i) for i in controlled},
              "sample_shape": list(np.shape(sample_ids)),
              "max_abs_logit_drift": float(drift.max()), "mean_abs_logit_drift": float(drift.mean()),
              "argmax_agreement": float(np.mean(after.argmax(-1) == before.argmax(-1)))}
    return MergedBack(plain, merged, merged_tensors, report)


def save_merged_hf(config: ModelConfig, params: dict, out_dir: str | Path, dtype: Optional[str] = None,
                   max_shard_bytes: int = 4 * 1024 ** 3, sample_ids=None) -> dict:
    """Merge back, then write the plain Llama as a Hugging Face directory whose config records the expansion
    it came from. Returns the merge report with the output directory."""
    merged = merge_back(config, params, sample_ids)
    written = save_hf_tensors(merged.config, merged.tensors, out_dir, dtype, max_shard_bytes,
                              expansion_provenance=provenance(config))
    return {**written, **merged.report}


def provenance(config: ModelConfig) -> dict:
    """The expansion dict kept in the merged config.json, marked as merged like the release does."""
    exp = to_dict(config.expansion)
    exp["freeze_ori_non_layers"] = True      # the release's key (see convert.hf.config_to_hf_dict)
    exp["num_exp_layers"] = MERGED_MARKER
    return exp
