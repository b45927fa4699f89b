"""Exceptions that mean "bad input" (config, mesh, paths, data): the CLI prints them as one line."""
from jax_controlllm.checksums import CheckpointDamagedError
from jax_controlllm.config import ConfigError
from jax_controlllm.convert.hf import ConversionError
from jax_controlllm.data.errors import DataError
from jax_controlllm.sharding import ShardingError
from jax_controlllm.tokenizer import TokenizerError

USER_ERRORS = (ConfigError, CheckpointDamagedError, ShardingError, ConversionError, DataError, TokenizerError,
               FileNotFoundError, FileExistsError)
