"""Training metrics: JSONL + TensorBoard writers (process 0 only), throughput and an MFU estimate."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import jax

from jax_controlllm.config import ModelConfig
from jax_controlllm.model.layout import layer_plan

# Peak dense bf16 FLOP/s per JAX device (one chip, or one core where JAX shows cores).
PEAK_FLOPS = {
    "tpu v4": 275e12, "tpu v5 lite": 197e12, "tpu v5e": 197e12, "tpu v5p": 459e12, "tpu v5": 459e12,
    "tpu v6 lite": 918e12, "tpu v6e": 918e12,
    "h100": 989e12, "h200": 989e12, "h800": 989e12, "a100": 312e12, "l4": 121e12, "a10g": 70e12,
}


def peak_flops_per_device(override: float = 0.0) -> Optional[float]:
    """From ``train.peak_flops_per_device`` or the device kind; None when unknown (CPU): no MFU then."""
    if override > 0:
        return override
    kind = jax.devices()[0].device_kind.lower()
    for name, flops in sorted(PEAK_FLOPS.items(), key=lambda item: -len(item[0])):
        if name in kind:
            return flops
    return None


def flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Matmul FLOPs of one training token: forward through every block, backward for activations from the
    first trainable block on, and weight gradients of the trainable matrices only (a frozen base costs
    ~2/3 of full fine-tuning, not 1/3). Attention scores count as 2 * seq_len * q_width per matmul pair.
    This is the "useful work" the MFU estimate divides by; remat recomputation is not counted."""
    c = config
    q_width, kv_width = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    layer = 2 * (c.hidden_size * (2 * q_width + 2 * kv_width) + 3 * c.hidden_size * c.intermediate_size)
    attention = 2 * 2 * seq_len * q_width / 2  # QK^T and PV, causal: half the positions on average
    head = 2 * c.hidden_size * c.vocab_size
    plan = layer_plan(c)
    forward = head
    backward_act = head
    weight_grads = head if c.train_embeddings else 0.0
    first_trainable = next((i for i, b in enumerate(plan) if b.trainable or b.kind == "controlled"), len(plan))
    merge = 2 * 2 * c.hidden_size  # dlerp gate, negligible but non-zero
    for i, block in enumerate(plan):
        branches = 2 if block.kind == "controlled" else 1
        cost = branches * (layer + attention) + (merge if block.kind == "controlled" else 0)
        forward += cost
        if i >= first_trainable:
            backward_act += cost
        if block.trainable:
            weight_grads += layer
        elif block.kind == "controlled":
            weight_grads += layer + merge
    return forward + backward_act + weight_grads


class MetricsWriter:
    """``metrics.jsonl`` (one object per logged step) and TensorBoard events under ``run_dir/tensorboard``."""

    def __init__(self, run_dir: str | Path, enabled: bool = True):
        self.enabled = enabled
        self._jsonl = None
        self._tb = None
        if not enabled:
            return
        run_dir = Path(run_dir)
        self._jsonl = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")
        try:
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(str(run_dir / "tensorboard"))
        except ImportError:  # optional: metrics.jsonl has everything
            self._tb = None

    def write(self, step: int, metrics: dict, prefix: str = "") -> None:
        if not self.enabled:
            return
        record = {"step": step, **{f"{prefix}{k}": v for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(record, allow_nan=True) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key == "step":
                    continue
                if isinstance(value, list):
                    for i, v in enumerate(value):
                        self._scalar(f"{key}/{i}", v, step)
                else:
                    self._scalar(key, value, step)

    def _scalar(self, tag: str, value, step: int) -> None:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            self._tb.add_scalar(tag, value, step)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
