"""Ahead-of-time check: compile the real train step for a TPU topology on any machine and report whether it
fits in HBM, before renting the pod.

    python -m launch.train --config configs/llama3.1_8b_openmath2_concat16_dlerp.yaml --aot-topology v5e:4x8

Needs libtpu (``pip install "jax[tpu]==<your jax version>"``), which provides the TPU compiler; no TPU and no
weights are needed: every argument is an abstract ShapeDtypeStruct with its sharding.
"""
from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from jax_controlllm.config import ConfigError, RunConfig
from jax_controlllm.model.params import abstract_params
from jax_controlllm.sharding import make_mesh, mesh_rules
from jax_controlllm.train.setup import base_model_config, check_batch, plan_step, trained_model_config
from jax_controlllm.train.state import TrainState, count_params, partition
from jax_controlllm.train.step import BATCH_KEYS

GIB = 1024 ** 3
# HBM per JAX device (= per chip; v4 and v5p show one device per chip in megacore mode).
HBM_BYTES = {"v4": 32 * GIB, "v5e": 16 * GIB, "v5litepod": 16 * GIB, "v5p": 95 * GIB, "v6e": 32 * GIB}


@dataclass
class MemoryReport:
    topology: str
    mesh: str
    devices: int
    trainable_params: int
    frozen_params: int
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    code_bytes: int
    hbm_bytes: int | None

    @property
    def peak_bytes(self) -> int:
        """Live at once on one device: inputs + outputs not aliased to (donated) inputs + scratch + code."""
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes + self.code_bytes

    @property
    def fits(self) -> bool | None:
        return None if self.hbm_bytes is None else self.peak_bytes <= self.hbm_bytes

    def __str__(self) -> str:
        def g(n):
            return f"{n / GIB:8.2f} GiB"
        lines = [f"AOT compile of the train step for {self.topology} ({self.devices} devices, mesh {self.mesh})",
                 f"  parameters: {self.trainable_params / 1e9:.3f}B trainable, {self.frozen_params / 1e9:.3f}B frozen",
                 "  per device:",
                 f"    arguments       {g(self.argument_bytes)}   (params, optimizer state, batch)",
                 f"    outputs         {g(self.output_bytes)}   "
                 f"({g(self.alias_bytes).strip()} aliased to donated inputs)",
                 f"    temporaries     {g(self.temp_bytes)}   (activations, gradients, collectives)",
                 f"    generated code  {g(self.code_bytes)}",
                 f"    peak            {g(self.peak_bytes)}"]
        if self.hbm_bytes is None:
            lines.append("  HBM per device unknown for this topology")
        else:
            verdict = "FITS" if self.fits else "DOES NOT FIT"
            lines.append(f"  HBM per device  {g(self.hbm_bytes)}  -> {verdict} "
                         f"({100 * self.peak_bytes / self.hbm_bytes:.0f}% used)")
        return "\n".join(lines)


# v4 and v5p chips hold two TensorCores that JAX drives as one device ("megacore"); v5e / v6e have one.
CHIP_CONFIG = {"v4": "megacore", "v5p": "megacore", "v5e": "default", "v6e": "default"}


def topology_devices(topology: str) -> list:
    family = topology.split(":")[0].lower()
    options = {"chip_config_name": CHIP_CONFIG[family], "chips_per_host_bounds": (2, 2, 1)} \
        if family in CHIP_CONFIG else {}
    try:
        from jax.experimental import topologies
        return list(topologies.get_topology_desc(platform="tpu", topology_name=topology, **options).devices)
    except Exception as err:  # noqa: BLE001 - missing libtpu shows up as several exception types
        raise ConfigError(f"--aot-topology {topology}: cannot describe this TPU topology ({type(err).__name__}: "
                          f"{str(err).splitlines()[0] if str(err) else ''}); it needs libtpu: pip install "
                          f"\"jax[tpu]=={jax.__version__}\", and a name like v5e:4x8 or v4:2x2x4") from None


def _abstract(shapes, shardings):
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def aot_memory_report(run: RunConfig, topology: str) -> MemoryReport:
    """Compile ``run``'s train step for ``topology`` and read the compiler's per-device memory analysis."""
    devices = topology_devices(topology)
    mesh = make_mesh(run.mesh.shape, run.mesh.axes, devices=devices)
    rules = mesh_rules(run.mesh.rules)
    check_batch(run, mesh, rules)
    model_config = trained_model_config(run, base_model_config(run))
    with jax.set_mesh(mesh):
        plan = plan_step(run, model_config, mesh, rules)
        trainable, frozen = partition(abstract_params(model_config), plan.mask)
        sh = plan.shardings
        state = TrainState(jax.ShapeDtypeStruct((), jnp.int32, sharding=sh.replicated),
                           _abstract(trainable, sh.trainable),
                           _abstract(jax.eval_shape(plan.tx.init, trainable), sh.state.opt_state))
        shape = (run.train.batch_size, run.train.seq_len)
        batch = {k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=sh.batch[k]) for k in BATCH_KEYS}
        compiled = plan.step_fn.lower(state, _abstract(frozen, sh.frozen), batch).compile()
    memory = compiled.memory_analysis()
    family = topology.split(":")[0].lower()
    return MemoryReport(
        topology=topology, mesh=" x ".join(f"{n}={s}" for n, s in mesh.shape.items()), devices=len(devices),
        trainable_params=count_params(trainable), frozen_params=count_params(frozen),
        argument_bytes=memory.argument_size_in_bytes, output_bytes=memory.output_size_in_bytes,
        alias_bytes=memory.alias_size_in_bytes, temp_bytes=memory.temp_size_in_bytes,
        code_bytes=memory.generated_code_size_in_bytes, hbm_bytes=HBM_BYTES.get(family))
