"""fedjax_lab.engine.distributed in a single process (the multi-process
behaviour is tested end to end in tests/experiments/test_multiprocess.py)."""

import jax
import numpy as np
import pytest

from fedjax_lab.engine import distributed
from fedjax_lab.engine.store import client_mesh


def test_one_process_is_the_coordinator_and_holds_every_row():
  assert not distributed.is_multiprocess()
  assert distributed.is_coordinator()
  assert distributed.local_client_rows(12, None) == (0, 12)
  assert distributed.local_client_rows(12, client_mesh()) == (0, 12)


def test_single_process_helpers_pass_values_through():
  tree = {"w": np.arange(3.0), "key": jax.random.key(4)}
  assert distributed.place_replicated(tree, client_mesh()) is tree
  assert distributed.broadcast_from_coordinator(tree) is tree
  assert distributed.broadcast_json({"a": [1, None]}) == {"a": [1, None]}
  assert distributed.broadcast_int(2**63 + 5) == 2**63 + 5
  host = distributed.replicated_to_host(
      {"w": jax.numpy.ones(2), "key": jax.random.key(1)})
  np.testing.assert_array_equal(host["w"], np.ones(2))
  assert jax.random.key_data(host["key"]).tolist() == jax.random.key_data(
      jax.random.key(1)).tolist()


def test_a_process_id_outside_the_run_is_rejected_before_joining():
  with pytest.raises(ValueError, match="process_id"):
    distributed.initialize("127.0.0.1:1", num_processes=2, process_id=2)
