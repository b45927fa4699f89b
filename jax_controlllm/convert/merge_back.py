"""Merge-back export: fold each controlled layer's two weight sets into one plain Llama layer (spec §5).

    lerp:                  W = W_p + t (W_e - W_p),  t = sigmoid(f)            (element-wise)
    slerp, dlerp, dlerpin: each row of the [out, in] matrix slerped with t = sigmoid(f) or sigmoid(b)

This is a weight-space merge, so the merged model is a *different function*; ``merge_back_params`` reports
how far its logits move on a sample. moe / proj / prog have no faithful fold and are refused. Hybrid models,
whose merge-back crashes in the release, merge here: controlled layers fold, inserted layers stay.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from jax_controlllm.config import ConfigError, ModelConfig
from jax_controlllm.convert.hf import MERGED_MARKER, from_hf_tensors, to_hf_tensors
from jax_controlllm.model.layout import layer_plan

FOLDABLE = ("lerp", "slerp", "dlerp", "dlerpin")
_LAYER_TENSORS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                  "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm")


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


def merge_back_params(config: ModelConfig, params: dict, sample_ids=None, seed: int = 0):
    """(plain config, merged params, report with the logit drift on a sample)."""
    from jax_controlllm.model import forward

    plain = merged_config(config)
    merged = from_hf_tensors(plain, merge_back_tensors(config, to_hf_tensors(config, params)))
    if sample_ids is None:
        rng = np.random.default_rng(seed)
        sample_ids = rng.integers(0, config.vocab_size, size=(2, min(64, config.max_position_embeddings)))
    before = np.asarray(forward(config, params, sample_ids))
    after = np.asarray(forward(plain, merged, sample_ids))
    drift = np.abs(after - before)
    report = {"merge_method": config.expansion.merge_method,
              "merged_layers": [i for i, b in enumerate(layer_plan(config)) if b.kind == "controlled"],
              "merge_weights_t": {i: merge_weight_t(config, to_hf_tensors(config, params), i)
                                  for i, b in enumerate(layer_plan(config)) if b.kind == "controlled"},
              "sample_shape": list(np.shape(sample_ids)),
              "max_abs_logit_drift": float(drift.max()), "mean_abs_logit_drift": float(drift.mean()),
              "argmax_agreement": float(np.mean(after.argmax(-1) == before.argmax(-1)))}
    return plain, merged, report


def provenance(config: ModelConfig) -> dict:
    """The expansion dict kept in the merged config.json, marked as merged like the release does."""
    exp = dataclasses.asdict(config.expansion)
    exp["num_exp_layers"] = MERGED_MARKER
    return exp
