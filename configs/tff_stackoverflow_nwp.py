"""Stack Overflow next-word prediction from TFF's files (Reddi et al. 2021).

For a researcher who has TFF's Stack Overflow files (``stackoverflow_train.h5``,
``stackoverflow_test.h5``, optionally ``stackoverflow.word_count``) in one
folder; nothing is downloaded:

  python -m experiments.run --config=configs/tff_stackoverflow_nwp.py \\
      --config.data.path=FOLDER

(FedJAX's SQLite files: add ``--config.data.name=fedjax_sqlite``; TFF's newer
``stackoverflow.sqlite``: ``--config.data.name=tff_sqlite``.) Evaluate on the
held-out users instead of the test split: ``--config.data.test_path=FOLDER/
stackoverflow_held_out.h5`` (h5), or ``--config.data.test_split=heldout``
(``tff_sqlite``). ``--config.data.max_clients=N`` reads the first N users of
each split, for a quick run. Reddi et
al.'s Stack Overflow NWP setup: the 10,000 most used words + pad / OOV / BOS
/ EOS, windows of 20, at most 1,000 sentences per user, their word LSTM
(embedding 96, LSTM 670, projection 96; 4,050,748 parameters), 50 clients a
round, 1 local epoch of batch 16, client SGD lr 10^-1/2, server Adam lr
10^-2, beta1 0.9, beta2 0.99, tau = eps = 10^-5, 1,500 rounds. ``,lstm`` is
the default model; ``transformer`` swaps in the transformer LM.
"""

from configs import common
from configs import shakespeare_nwp_fedavg


def get_config(arg: str = ""):
  model, mode = shakespeare_nwp_fedavg.parse_arg(arg or "lstm")
  config = common.base_config()
  config.num_rounds = 1500
  config.cohort_size = 50
  config.eval_every = 100
  config.eval_max_examples = 10000
  # Every option the three file readers take, so each can be set from the
  # command line ("" = the reader's default; a reader ignores an empty option
  # it does not take, e.g. test_split under tff_h5).
  config.data.update({"name": "tff_h5", "path": "", "test_path": "",
                      "train_split": "", "test_split": "",
                      "word_count_path": "", "max_clients": 0,
                      "kind": "stackoverflow", "sequence_length": 20,
                      "vocab_size": 10000, "max_examples_per_client": 1000})
  config.model.name = model
  config.algorithm = "fedopt"
  config.client.update({"optimizer": "sgd", "learning_rate": 10 ** -0.5,
                        "num_epochs": 1, "batch_size": 16})
  config.server.update({"optimizer": "adam", "learning_rate": 0.01,
                        "hparams": {"b1": 0.9, "b2": 0.99, "eps": 1e-5}})
  return common.apply_mode(config, mode)
