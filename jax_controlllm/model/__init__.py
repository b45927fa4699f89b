"""The Llama model and its Control LLM expansion, as pure functions over parameter pytrees."""
from jax_controlllm.model.layout import block_groups, layer_plan
from jax_controlllm.model.llama import final_hidden, forward, logits_from_hidden
from jax_controlllm.model.params import (
                                         ParamSpec,
                                         abstract_params,
                                         init_params,
                                         logical_axes,
                                         param_specs,
                                         spec_trainable,
                                         stack_blocks,
                                         unstack_blocks,
)

__all__ = ["forward", "final_hidden", "logits_from_hidden", "init_params", "param_specs", "abstract_params",
           "logical_axes", "ParamSpec", "layer_plan", "block_groups", "unstack_blocks", "stack_blocks",
           "spec_trainable"]
