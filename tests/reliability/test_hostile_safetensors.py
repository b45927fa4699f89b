"""Hostile safetensors files: headers claiming absurd sizes, shapes or offsets are rejected with a
SafetensorsError before any tensor memory is allocated; valid files still round-trip exactly."""
import json
import struct
import tracemalloc

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jax_controlllm.convert.safetensors_io import SafetensorsError, SafetensorsFile, save_file

PROPERTY = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MEMORY_BOUND = 1 << 20            # far below what any absurd claim would take


def write_raw(path, header, payload: bytes = b"", claimed_length=None):
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob) if claimed_length is None else claimed_length) + blob + payload)
    return path


def open_and_read_all(path) -> None:
    """Every tensor of the file, or a SafetensorsError with a message; little memory either way."""
    tracemalloc.start()
    try:
        tensors = SafetensorsFile(path)
        for name in tensors:
            tensors[name]
    except SafetensorsError as err:
        assert str(err).strip()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < MEMORY_BOUND, peak


JSON = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(), st.text(max_size=5)),
                    lambda inner: st.one_of(st.lists(inner, max_size=3),
                                            st.dictionaries(st.text(max_size=5), inner, max_size=3)), max_leaves=5)
DIMS = st.one_of(st.integers(-5, 2**62), st.sampled_from([0, 1, 2**31, 2**40, 2**64]), JSON)
OFFSETS = st.one_of(st.lists(st.one_of(st.integers(-10, 2**63), JSON), max_size=3), JSON)
ENTRY = st.one_of(JSON, st.fixed_dictionaries({
    "dtype": st.one_of(st.sampled_from(["F32", "BF16", "I8", "F64", "U8", "XX"]), JSON),
    "shape": st.one_of(st.lists(DIMS, max_size=4), JSON),
    "data_offsets": OFFSETS}))


@PROPERTY
@given(header=st.one_of(st.dictionaries(st.text(max_size=5), ENTRY, max_size=3), JSON),
       payload=st.binary(max_size=64), claimed=st.one_of(st.none(), st.integers(0, 2**64 - 1)))
def test_hostile_headers_are_rejected_before_allocating(tmp_path_factory, header, payload, claimed):
    path = write_raw(tmp_path_factory.mktemp("st") / "model.safetensors", header, payload, claimed)
    open_and_read_all(path)


@pytest.mark.parametrize("header, claimed, message", [
    ({}, 2**64 - 1, "header claims"),                                              # an 18 EB header
    ({"w": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 16]}}, None, "needs"),
    ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 2**62]}}, None, "claims bytes"),
    ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [2**62, 2**62 + 16]}}, None, "claims bytes"),
    ({"w": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}}, None, "invalid shape"),
    ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
      "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, None, "overlap"),
])
def test_absurd_claims_are_named(tmp_path, header, claimed, message):
    path = write_raw(tmp_path / "model.safetensors", header, bytes(32), claimed)
    tracemalloc.start()
    try:
        with pytest.raises(SafetensorsError, match=message):
            SafetensorsFile(path)
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < MEMORY_BOUND


@pytest.mark.parametrize("entry", [
    {"dtype": [], "shape": [], "data_offsets": [0, 0]},
    {"dtype": "F32", "shape": None, "data_offsets": [0, 0]},
])
def test_header_entries_of_the_wrong_json_type(tmp_path, entry):
    path = write_raw(tmp_path / "model.safetensors", {"w": entry})
    with pytest.raises(SafetensorsError):
        SafetensorsFile(path)


@PROPERTY
@given(st.dictionaries(st.text(min_size=1, max_size=8).filter(lambda n: n != "__metadata__"),
                       st.tuples(st.sampled_from(["float32", "float16", "int8", "uint8", "int64"]),
                                 st.lists(st.integers(0, 4), max_size=3)), max_size=4))
def test_valid_files_round_trip(tmp_path_factory, specs):
    rng = np.random.default_rng(0)
    tensors = {name: rng.integers(0, 100, size=shape).astype(dtype) for name, (dtype, shape) in specs.items()}
    path = tmp_path_factory.mktemp("st") / "model.safetensors"
    save_file(tensors, path)
    loaded = SafetensorsFile(path)
    assert sorted(loaded) == sorted(tensors)
    for name, array in tensors.items():
        np.testing.assert_array_equal(loaded[name], array)
        assert loaded[name].dtype == array.dtype
