"""Execution strategies: what a round of a given padded length really runs
(``unroll`` past ``max_unroll_steps`` is scan), and the labels saying so."""

import pytest

from fedjax_lab.engine import strategy as strategy_lib
from fedjax_lab.engine.strategy import Strategy


def test_unroll_falls_back_to_scan_past_max_unroll_steps():
  unroll = Strategy("map", "unroll", max_unroll_steps=4)
  assert [strategy_lib.effective_step_loop(unroll, n)
          for n in (0, 1, 4, 5, 100)] == [
              "unroll", "unroll", "unroll", "scan", "scan"]
  assert unroll.label == "map+unroll"  # the request, whatever the round
  assert strategy_lib.effective_label(unroll, 4) == "map+unroll"
  assert strategy_lib.effective_label(unroll, 5) == "map+scan"
  chunked = Strategy("chunked", "unroll", chunk_size=5, max_unroll_steps=2)
  assert strategy_lib.effective_label(chunked, 3) == "chunked5+scan"


@pytest.mark.parametrize("spec", ["vmap+scan", "chunked8+scan", "vmap+host"])
def test_scan_and_host_are_always_honoured(spec):
  strategy = strategy_lib.parse_strategy(spec, "dense")
  for num_steps in (1, strategy.max_unroll_steps + 1, 10_000):
    assert (strategy_lib.effective_step_loop(strategy, num_steps) ==
            strategy.step_loop)
    assert strategy_lib.effective_label(strategy, num_steps) == strategy.label


def test_negative_step_count_is_refused():
  with pytest.raises(ValueError, match="num_steps"):
    strategy_lib.effective_step_loop(Strategy(), -1)
