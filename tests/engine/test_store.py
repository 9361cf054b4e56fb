"""The host-side client-state store: stack, gather (pads get row 0),
scatter (padding slots never written), for plain states and for
``ClientStates`` pairs with per-client aggregation state."""

import numpy as np

from fedjax_lab.algorithms import base
from fedjax_lab.engine import round as round_lib
from fedjax_lab.engine import store


def test_round_module_reexports_the_store():
  for name in ("cohort_arrays", "stack_client_states", "gather_client_states",
               "scatter_client_states", "client_mesh", "place_cohort"):
    assert getattr(round_lib, name) is getattr(store, name)


def test_scatter_copies_by_default_and_writes_in_place_when_asked():
  store = {"c": np.zeros([5, 2], np.float32)}
  indices = np.array([3, -1, 0])  # a padded slot in the middle
  updated = {"c": np.arange(6, dtype=np.float32).reshape(3, 2) + 1}
  copied = round_lib.scatter_client_states(store, indices, updated)
  assert not store["c"].any()  # the input is untouched
  np.testing.assert_array_equal(copied["c"][[3, 0]], [[1, 2], [5, 6]])
  assert not copied["c"][[1, 2, 4]].any()  # unsampled rows stay as they were
  written = round_lib.scatter_client_states(store, indices, updated,
                                            in_place=True)
  assert written["c"] is store["c"]
  np.testing.assert_array_equal(store["c"], copied["c"])
  frozen = {"c": np.zeros([5, 2], np.float32)}
  frozen["c"].setflags(write=False)  # e.g. restored read-only: copied
  out = round_lib.scatter_client_states(frozen, indices, updated,
                                        in_place=True)
  assert out["c"] is not frozen["c"] and not frozen["c"].any()


def test_paired_states_round_trip_and_padding_rows_stay():
  template = base.ClientStates(algorithm=np.zeros([2], np.float32),
                               aggregation=((np.zeros([3], np.float32), ()),
                                            ()))
  states = store.stack_client_states(template, 4)
  assert isinstance(states, base.ClientStates)
  indices = np.array([2, -1])
  gathered = store.gather_client_states(states, indices)
  assert gathered.aggregation[0][0].shape == (2, 3)
  updated = base.ClientStates(
      algorithm=np.ones([2, 2], np.float32),
      aggregation=((np.full([2, 3], 5.0, np.float32), ()), ()))
  out = store.scatter_client_states(states, indices, updated)
  assert isinstance(out, base.ClientStates)
  np.testing.assert_array_equal(out.aggregation[0][0][2], [5.0, 5.0, 5.0])
  np.testing.assert_array_equal(out.algorithm[2], [1.0, 1.0])
  for row in (0, 1, 3):  # row 0 fed the padding slot, but is not written
    assert not out.aggregation[0][0][row].any() and not out.algorithm[row].any()
