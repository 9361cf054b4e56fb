"""Comparing run configs: dotted differences, blocks that cannot affect a
run, values at dotted keys, and the keys a resume may change."""

from fedjax_lab.training import config_diff


def test_differences_are_dotted_and_sorted():
  saved = {"seed": 0, "client": {"learning_rate": 0.1, "batch_size": 10},
           "gone": 1}
  current = {"seed": 0, "client": {"learning_rate": 0.2, "batch_size": 10},
             "new": {"x": 1}}
  assert config_diff.config_differences(saved, current) == [
      "client.learning_rate", "gone", "new"]
  assert config_diff.config_differences(saved, saved) == []


def test_inactive_blocks_follow_the_algorithm_and_switches():
  config = {"algorithm": "scaffold", "compression": {"method": "none"},
            "personalization": {"enabled": True}}
  inactive = config_diff.inactive_blocks(config)
  assert "scaffold" not in inactive and "personalization" not in inactive
  assert {"fedprox", "mime", "compression"} <= inactive
  config["compression"]["method"] = "topk"
  assert "compression" not in config_diff.inactive_blocks(config)


def test_dotted_value_and_resumable_keys():
  config = {"client": {"learning_rate": 0.1}}
  assert config_diff.dotted_value(config, "client.learning_rate") == 0.1
  assert config_diff.dotted_value(config, "client.momentum") == "<missing>"
  assert config_diff.dotted_value(config, "client.learning_rate.x") == (
      "<missing>")
  assert "num_rounds" in config_diff.RESUMABLE_CHANGES
  assert "seed" not in config_diff.RESUMABLE_CHANGES


def test_mimelite_keeps_its_mime_block_active():
  # mimelite is configured by the mime block: a change there must block a
  # resume (the block is read from the registry, not a hand-kept list).
  inactive = config_diff.inactive_blocks({"algorithm": "mimelite"})
  assert "mime" not in inactive and "fedprox" in inactive


def test_keys_added_later_resume_only_at_their_reproducing_value():
  saved = {"client": {"learning_rate": 0.1}}
  same = {"client": {"learning_rate": 0.1, "shuffle": True,
                     "step_padding": "bucketed"}}
  changed = config_diff.config_differences(saved, same)
  assert config_diff.added_key_defaults(saved, same, changed) == []
  other = {"client": {"learning_rate": 0.1, "shuffle": False,
                      "step_padding": "bucketed"}}
  changed = config_diff.config_differences(saved, other)
  assert config_diff.added_key_defaults(saved, other, changed) == [
      "client.shuffle"]
