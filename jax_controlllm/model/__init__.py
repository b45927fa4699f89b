"""The Llama model and its Control LLM expansion, as pure functions over parameter pytrees.

Layers import downwards only:

    layers.py   RMSNorm, RoPE, attention, SwiGLU, the decoder layer
    control.py  the controlled layer: merge methods, divergence                       (uses layers)
    layout.py   which blocks a config has and how they group for the scan
    params.py   every weight declared once (ParamSpec): init, shapes, shardings, trainable mask
    stack.py    the stack of blocks (scan over block groups, remat) and ``forward``  (uses all above)
    expand.py   expansion surgery: expand a plain Llama, cast to the declared dtypes
"""
from jax_controlllm.model.layout import block_groups, layer_plan
from jax_controlllm.model.params import (
    ParamSpec,
    abstract_params,
    init_params,
    logical_axes,
    param_specs,
    stack_blocks,
    trainable_mask,
    unstack_blocks,
)
from jax_controlllm.model.stack import final_hidden, forward, logits_from_hidden

__all__ = ["forward", "final_hidden", "logits_from_hidden", "init_params", "param_specs", "abstract_params",
           "logical_axes", "ParamSpec", "layer_plan", "block_groups", "unstack_blocks", "stack_blocks",
           "trainable_mask"]
