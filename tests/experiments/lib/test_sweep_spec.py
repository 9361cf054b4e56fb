"""experiments.lib.sweep_spec: grids, member lists, typing, slugs, errors."""

from __future__ import annotations

import pytest

from configs import synthetic_logreg_fedavg
from experiments.lib import sweep_spec


def _resolve(spec: str, read_text=None, fixed=()):
  config = synthetic_logreg_fedavg.get_config("tiny")
  return sweep_spec.resolve_members(
      sweep_spec.parse_spec(spec, read_text), config, fixed)


def test_grid_is_the_cartesian_product_typed_by_the_config():
  members = _resolve("client.learning_rate=1,0.3 data.iid=true,False "
                     "model.name=1e3 num_rounds=5")
  assert [m.overrides for m in members] == [
      {"client.learning_rate": lr, "data.iid": iid, "model.name": "1e3",
       "num_rounds": 5}
      for lr in (1.0, 0.3) for iid in (True, False)]
  first = members[0].overrides
  assert type(first["client.learning_rate"]) is float
  assert type(first["num_rounds"]) is int and type(first["data.iid"]) is bool
  assert members[0].slug == ("client.learning_rate=1,data.iid=true,"
                             "model.name=1e3,num_rounds=5")
  assert len({m.slug for m in members}) == 4


def test_quotes_keep_commas_and_spaces_in_one_string():
  members = _resolve("model.name='a, b',\"c d\",e seed=0")
  assert [m.overrides["model.name"] for m in members] == ["a, b", "c d", "e"]
  assert members[0].slug == "model.name=a__b,seed=0"  # sanitised
  assert sweep_spec.parse_value(sweep_spec.RawValue("1", quoted=True)) == "1"
  assert sweep_spec.parse_value(sweep_spec.RawValue("1")) == 1
  assert sweep_spec.parse_value(sweep_spec.RawValue("2.5e-3")) == 0.0025
  assert sweep_spec.parse_value(sweep_spec.RawValue("TRUE")) is True
  assert sweep_spec.parse_value(sweep_spec.RawValue("sgd")) == "sgd"


def test_at_file_grid_and_explicit_list():
  files = {
      "grid.txt": "# a grid over two lines\nclient.learning_rate=0.1,0.2\n\n"
                  "seed=0,1,2\n",
      "list.txt": "# one member per line\nclient.learning_rate=0.1 seed=3\n"
                  "client.optimizer=adam\n  seed=4  \n",
  }

  def read_text(path):
    if path not in files:
      raise FileNotFoundError(path)
    return files[path]

  grid = _resolve("@grid.txt", read_text)
  assert [tuple(m.overrides.values()) for m in grid] == [
      (lr, seed) for lr in (0.1, 0.2) for seed in (0, 1, 2)]
  parsed = sweep_spec.parse_spec("@list.txt", read_text)
  assert parsed.kind == "list" and parsed.source == "list.txt"
  listed = _resolve("@list.txt", read_text)
  assert [m.overrides for m in listed] == [
      {"client.learning_rate": 0.1, "seed": 3},
      {"client.optimizer": "adam"}, {"seed": 4}]
  with pytest.raises(sweep_spec.SpecError, match="cannot read"):
    _resolve("@missing.txt", read_text)


def test_unknown_key_names_the_closest_valid_keys():
  with pytest.raises(sweep_spec.SpecError) as error:
    _resolve("client.learning_rat=0.1")
  # The closest key comes first; other near matches may follow.
  assert str(error.value).startswith(
      "unknown config key 'client.learning_rat' in --sweep; did you mean "
      "client.learning_rate, ")
  # Nothing close: the keys of the same section, else where to list them.
  with pytest.raises(sweep_spec.SpecError,
                     match=r"'client\.qqqqqqqqqqqq'.*mean client\.batch_size"):
    _resolve("client.qqqqqqqqqqqq=1")
  with pytest.raises(sweep_spec.SpecError, match="'qqqq'.*--helpfull"):
    _resolve("qqqq=1")


@pytest.mark.parametrize("spec, message", [
    ("privacy=1", "is a config section"),
    ("num_rounds=2.5", "num_rounds is a int"),
    ("data.iid=maybe", "data.iid is a bool"),
    ("seed=1,1", "appears more than once"),
    ("seed=1 seed=2", "more than once in the grid"),
    ("seed=1, 2", "empty value"),
    ("model.name='abc", "unterminated"),
    ("", "empty"),
])
def test_bad_specs_are_refused(spec, message):
  with pytest.raises(sweep_spec.SpecError, match=message):
    _resolve(spec)


def test_a_key_fixed_on_the_command_line_cannot_be_swept():
  with pytest.raises(sweep_spec.SpecError, match="both swept and set"):
    _resolve("seed=0,1", fixed=["seed"])


def test_long_slugs_are_cut_and_stay_distinct():
  names = [f"{'x' * 200}{i}" for i in range(2)]
  members = _resolve("model.name=" + ",".join(names))
  slugs = [m.slug for m in members]
  assert all(len(s) == sweep_spec.MAX_SLUG_CHARS for s in slugs)
  assert slugs[0] != slugs[1]
