"""From a privacy plan to its aggregation chain and server optimizer."""

import os
import sys

import pytest

from fedjax_lab.algorithms import base, compression
from fedjax_lab.privacy import mechanisms
from fedjax_lab.training import setup

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))


def _plan(config_name, num_clients=100):
  sys.path.insert(0, ROOT)
  config = __import__(f"configs.{config_name}",
                      fromlist=["get_config"]).get_config("tiny")
  return setup.build_privacy(config, num_clients)


@pytest.mark.parametrize("config_name", ["dp_mnist", "dp_mnist_adaptive",
                                         "dp_ftrl_mnist", "ldp_mnist"])
def test_without_compression_the_dp_link_alone(config_name):
  link = mechanisms.build_aggregator(_plan(config_name))
  assert isinstance(link, base.Aggregator) and link.uniform_weights_only


@pytest.mark.parametrize("config_name, num_links", [
    ("dp_mnist", 3), ("dp_ftrl_mnist", 3), ("dp_mnist_adaptive", 2)])
def test_compression_chains_clip_compress_dp(config_name, num_links):
  privacy = _plan(config_name)
  chain = mechanisms.build_aggregator(
      privacy, compression.compress(compression.top_k(k=2)))
  assert isinstance(chain, base.Transform)
  assert chain.client_init is not None and chain.uniform_weights_only
  assert len(chain.init()) == num_links


def test_compression_without_dp_is_a_weighted_mean():
  chain = mechanisms.build_aggregator(
      None, compression.compress(compression.identity()))
  assert len(chain.init()) == 2 and not chain.uniform_weights_only


def test_compression_with_local_dp_is_refused():
  with pytest.raises(ValueError, match="after decoding"):
    mechanisms.build_aggregator(_plan("ldp_mnist"), compression.compress(
        compression.identity()))


def test_without_a_plan_a_dp_link_cannot_be_built():
  with pytest.raises(ValueError, match="privacy plan"):
    mechanisms.build_aggregator(None)
