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
    "lora_rank": None,          # LoRA's rank dimension: small, replicated
    "act_batch": ("data", "fsdp"),
    "act_seq": None,
    "act_embed": None,
    "act_heads": ("tensor",),
    "act_kv_heads": ("tensor",),
    "act_mlp": ("tensor",),
    "act_vocab": ("tensor",),
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


# ----------------------------------------------------------------------------------------------
# Meshes: "4x8" / "2x2x8" / "-1x8" -> jax.sharding.Mesh with Auto axes
# ----------------------------------------------------------------------------------------------

# Axis names by mesh rank when the config does not name them. One axis: pure FSDP; two: FSDP x tensor
# parallel; three: data parallel (replicated weights) x FSDP x tensor parallel.
DEFAULT_AXES: dict[int, tuple[str, ...]] = {1: ("fsdp",), 2: ("fsdp", "tensor"), 3: ("data", "fsdp", "tensor")}


class MeshError(ShardingError):
    """The requested mesh cannot be built on the available devices; the message says how to fix it."""


def cpu_devices_hint(size: int) -> str:
    return (f"; on CPU, simulate {size} devices with --cpu-devices {size} (it sets "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={size} before JAX starts)")


def parse_mesh_shape(text: str, num_devices: int, platform: str = "cpu") -> tuple[int, ...]:
    """"4x8" -> (4, 8); one "-1" takes whatever the device count leaves. Errors name both sizes."""
    try:
        dims = tuple(int(part) for part in str(text).lower().replace("*", "x").split("x"))
    except ValueError:
        raise MeshError(f"mesh {text!r}: expected sizes joined by 'x', like 4x8, 2x2x8 or -1x8") from None
    if any(d == 0 or d < -1 for d in dims) or dims.count(-1) > 1:
        raise MeshError(f"mesh {text!r}: sizes must be positive, with at most one -1 (inferred)")
    known = 1
    for d in dims:
        known *= d if d != -1 else 1
    if -1 in dims:
        if num_devices % known:
            raise MeshError(f"mesh {text!r}: {num_devices} devices cannot be split into {known}-device groups; "
                            f"use a mesh whose fixed sizes divide {num_devices}")
        dims = tuple(num_devices // known if d == -1 else d for d in dims)
        known = num_devices
    if known != num_devices:
        hint = cpu_devices_hint(known) if platform == "cpu" else ""
        raise MeshError(f"mesh {text!r} needs {known} devices but {num_devices} are available; use a mesh of "
                        f"size {num_devices} (e.g. --mesh 1x{num_devices}){hint}")
    return dims


def mesh_axis_names(rank: int, axes: Optional[Sequence[str]] = None) -> tuple[str, ...]:
    if axes is not None:
        names = tuple(str(a) for a in axes)
        if len(names) != rank:
            example = ",".join(DEFAULT_AXES.get(rank, ("a",) * rank))
            raise MeshError(f"mesh axes {list(names)} name {len(names)} axes but the mesh has {rank} dimensions; "
                            f"give one name per dimension (e.g. --mesh-axes {example})")
        if len(set(names)) != rank:
            raise MeshError(f"mesh axes {list(names)}: names must be distinct")
        return names
    if rank not in DEFAULT_AXES:
        raise MeshError(f"a {rank}-dimensional mesh needs explicit axis names (mesh.axes or --mesh-axes)")
    return DEFAULT_AXES[rank]


def make_mesh(shape: str = "1", axes: Optional[Sequence[str]] = None, devices=None) -> jax.sharding.Mesh:
    """A mesh of Auto axes over ``devices`` (default: all devices of all processes)."""
    devices = list(jax.devices() if devices is None else devices)
    platform = devices[0].platform if devices else "cpu"
    dims = parse_mesh_shape(shape, len(devices), platform)
    names = mesh_axis_names(len(dims), axes)
    auto = (jax.sharding.AxisType.Auto,) * len(dims)
    return jax.make_mesh(dims, names, axis_types=auto, devices=devices)


def mesh_rules(overrides: Optional[dict] = None) -> dict:
    """DEFAULT_RULES with the config's overrides (a logical name -> mesh axis, list of axes, or null)."""
    rules = dict(DEFAULT_RULES)
    for name, value in (overrides or {}).items():
        if name not in DEFAULT_RULES:
            raise ShardingError(f"mesh.rules: unknown logical axis {name!r}; known: {', '.join(sorted(DEFAULT_RULES))}")
        if value is not None and not isinstance(value, (str, list, tuple)):
            raise ShardingError(f"mesh.rules.{name}: expected a mesh axis name, a list of names or null, got {value!r}")
        rules[name] = None if value is None else _as_tuple(value)
    return rules


# ----------------------------------------------------------------------------------------------
# Shardings of parameters and batches
# ----------------------------------------------------------------------------------------------

def named_sharding(mesh, logical_axes: Sequence[Optional[str]], shape: Sequence[int], rules: dict) -> NamedSharding:
    spec = logical_to_spec(logical_axes, rules, mesh.axis_names, shape, dict(mesh.shape))
    return NamedSharding(mesh, spec)


def batch_axes(mesh, rules: Optional[dict] = None) -> tuple[str, ...]:
    """Mesh axes the batch dimension is split over (the "act_batch" rule, restricted to this mesh)."""
    rules = rules or DEFAULT_RULES
    return tuple(a for a in _as_tuple(rules.get("act_batch")) if a in mesh.axis_names)


def data_parallel_size(mesh, rules: Optional[dict] = None) -> int:
    size = 1
    for a in batch_axes(mesh, rules):
        size *= mesh.shape[a]
    return size


def batch_sharding(mesh, rules: Optional[dict] = None, ndim: int = 2) -> NamedSharding:
    """[batch, seq, ...] arrays: batch over the data-parallel axes, the rest replicated."""
    axes = batch_axes(mesh, rules)
    first = axes[0] if len(axes) == 1 else (axes or None)
    return NamedSharding(mesh, PartitionSpec(first, *([None] * (ndim - 1))))


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())
