"""Logical axis names -> device mesh axes.

Every weight and every constrained activation carries logical axis names ("embed", "mlp", "act_batch", ...).
A small rules table maps each logical name to zero, one or several mesh axes. A rule that would place two
dimensions of one array on the same mesh axis is a collision and raises, instead of silently replicating.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Iterable, Optional, Sequence

import jax
from jax.sharding import NamedSharding, PartitionSpec

# Parameters: FSDP over "fsdp" (and "data" for ZeRO-3 style meshes), tensor parallel over "tensor".
# Activations: batch over the data-parallel axes, features over "tensor".
DEFAULT_RULES: dict[str, Optional[tuple[str, ...]]] = {
    "vocab": ("tensor",),
    "embed": ("fsdp",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "mlp": ("tensor",),
    "layers": None,
    "norm": None,
    "gate": None,
    "act_batch": ("data", "fsdp"),
    "act_seq": None,
    "act_embed": None,
    "act_heads": ("tensor",),
    "act_kv_heads": ("tensor",),
    "act_mlp": ("tensor",),
    "act_vocab": ("tensor",),
    "act_head_dim": None,
}


class ShardingError(ValueError):
    pass


def _as_tuple(value) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    return tuple(value)


def logical_to_spec(logical_axes: Sequence[Optional[str]], rules: dict, mesh_axis_names: Iterable[str],
                    shape: Optional[Sequence[int]] = None, mesh_shape: Optional[dict] = None) -> PartitionSpec:
    """PartitionSpec for an array with the given logical axes.

    Mesh axes absent from the mesh are dropped (a 2-D mesh has no "data" axis). When ``shape`` and
    ``mesh_shape`` are given, a dimension that the mesh axes do not divide stays replicated: tiny test models
    must run on big meshes.
    """
    present = set(mesh_axis_names)
    used: dict[str, str] = {}
    spec = []
    for dim, name in enumerate(logical_axes):
        if name is None:
            spec.append(None)
            continue
        if name not in rules:
            raise ShardingError(f"logical axis {name!r} has no sharding rule; known: {sorted(rules)}")
        axes = tuple(a for a in _as_tuple(rules[name]) if a in present)
        if shape is not None and mesh_shape is not None and axes:
            size = 1
            for a in axes:
                size *= mesh_shape[a]
            if shape[dim] % size:
                axes = ()
        for a in axes:
            if a in used:
                raise ShardingError(f"logical axes {used[a]!r} and {name!r} both map to mesh axis {a!r} in "
                                    f"{tuple(logical_axes)}; change the rules so each mesh axis is used once")
            used[a] = name
        spec.append(axes[0] if len(axes) == 1 else (axes or None))
    return PartitionSpec(*spec)


class _Context(threading.local):
    mesh = None
    rules = DEFAULT_RULES


_ctx = _Context()


@contextlib.contextmanager
def activation_sharding(mesh, rules: Optional[dict] = None):
    """Within this context (while tracing), ``constrain`` pins activations to the mesh."""
    old = (_ctx.mesh, _ctx.rules)
    _ctx.mesh, _ctx.rules = mesh, dict(rules or DEFAULT_RULES)
    try:
        yield
    finally:
        _ctx.mesh, _ctx.rules = old


def constrain(x: jax.Array, logical_axes: Sequence[Optional[str]]) -> jax.Array:
    """Sharding constraint on an activation; a no-op outside ``activation_sharding`` (single device)."""
    mesh = _ctx.mesh
    if mesh is None:
        return x
    spec = logical_to_spec(logical_axes, _ctx.rules, mesh.axis_names, x.shape, dict(mesh.shape))
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
