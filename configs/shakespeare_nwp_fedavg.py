"""FedAvg on word-level next-word prediction over Shakespeare's speaking roles.

The task is built as Stack Overflow next-word prediction is (TFF; Reddi et
al. 2021, "Adaptive Federated Optimization"): the 10,000 words used by the
most training clients plus pad / OOV / BOS / EOS (10,004 ids), one verse
line per example, windows of 20 tokens, at most 1,000 examples per client
(``fedjax_lab/data/sources/shakespeare_words.py``). Reddi et al.'s Stack
Overflow NWP settings: 1 local epoch of batch 16, client SGD lr 10^-1/2,
server SGD lr 1 for FedAvg; their cohort of 50 is cut to 20 here (the
population is 1,154 roles, not 342,477 users) to fit CPU runs.

Argument (``--config=configs/shakespeare_nwp_fedavg.py:ARG``): ``transformer``
(default: the decoder-only transformer LM, ``fedjax_lab/models/
transformer.py``), ``lstm`` (Reddi et al.'s word LSTM: embedding 96, LSTM 670,
projection 96), optionally followed by ``,tiny`` (a few-second smoke run).
Accuracy excludes pad / OOV / BOS / EOS targets (``accuracy_no_oov_eos``
style metrics: see the model's ``example_metrics``).
"""

from configs import common

MODELS = {"transformer": "transformer_lm", "lstm": "word_lstm"}


def parse_arg(arg: str) -> tuple[str, str]:
  """``"lstm,tiny"`` -> ``("word_lstm", "tiny")``; the model defaults to the
  transformer."""
  parts = [part for part in arg.split(",") if part]
  mode = "tiny" if "tiny" in parts else ""
  names = [part for part in parts if part != "tiny"]
  if len(names) > 1 or (names and names[0] not in MODELS):
    raise ValueError(f"config argument {arg!r}: expected one of "
                     f"{sorted(MODELS)}, optionally followed by ',tiny'.")
  return MODELS[names[0] if names else "transformer"], mode


def get_config(arg: str = ""):
  model, mode = parse_arg(arg)
  config = common.base_config()
  config.num_rounds = 300
  config.cohort_size = 20
  config.eval_every = 25
  config.eval_max_examples = 4096
  config.data.update({"name": "shakespeare_words", "sequence_length": 20,
                      "vocab_size": 10000, "max_examples_per_client": 1000})
  config.model.name = model
  config.client.update({"optimizer": "sgd", "learning_rate": 10 ** -0.5,
                        "num_epochs": 1, "batch_size": 16})
  config.server.update({"optimizer": "sgd", "learning_rate": 1.0})
  return common.apply_mode(config, mode)
