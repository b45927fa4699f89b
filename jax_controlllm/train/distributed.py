"""Multi-process start-up: ``jax.distributed.initialize`` from flags or the cluster's environment."""
from __future__ import annotations

import os
from typing import Optional

import jax

from jax_controlllm.config import ConfigError

# Environment variables that mean "several processes form one job": JAX's own, SLURM, Open MPI.
_CLUSTER_ENV = ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")


def initialize_distributed(coordinator: Optional[str] = None, num_processes: Optional[int] = None,
                           process_id: Optional[int] = None, auto: bool = False) -> bool:
    """Join the multi-process job if one is described; returns whether JAX runs distributed.

    Explicit flags win (``--coordinator host:port --num-processes N --process-id i``). With ``auto``
    (``--distributed``, e.g. on every worker of a Cloud TPU pod) or a cluster environment (JAX_COORDINATOR_ADDRESS,
    SLURM, Open MPI with more than one task) JAX detects the rest itself. Single-process runs do nothing.
    """
    explicit = coordinator is not None or num_processes is not None or process_id is not None
    if explicit:
        if coordinator is None or num_processes is None or process_id is None:
            raise ConfigError("--coordinator, --num-processes and --process-id go together (e.g. --coordinator "
                              "10.0.0.1:8476 --num-processes 2 --process-id 0); or use --distributed to detect them")
        if not 0 <= process_id < num_processes:
            raise ConfigError(f"--process-id {process_id} is not in [0, {num_processes})")
        jax.distributed.initialize(coordinator, num_processes, process_id)
        return True
    if auto or _cluster_described():
        jax.distributed.initialize()
        return True
    return False


def _cluster_described() -> bool:
    for name in _CLUSTER_ENV:
        value = os.environ.get(name)
        if value and (name == "JAX_COORDINATOR_ADDRESS" or value.isdigit() and int(value) > 1):
            return True
    return False
