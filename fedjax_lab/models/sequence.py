"""Next-token loss and metrics shared by the word-level language models.

Token ids follow TFF's Stack Overflow next-word task (``vocab`` words plus
four special tokens): pad ``0``, words ``1..vocab``, one OOV bucket
``vocab + 1``, BOS ``vocab + 2``, EOS ``vocab + 3``; with ``vocab = 10000``
that is 10,004 ids. ``x`` is a sequence ``[B, T]`` and ``y`` the same
sequence shifted by one (the next token at every position).

Everything is reported per sequence as ``(value_sum, weight)`` (see
:mod:`fedjax_lab.models.base`): ``value_sum`` sums over the target tokens a
quantity counts and ``weight`` counts them, so a padded target token
contributes exactly nothing and a padded sequence (example mask 0) neither.

* loss: token cross-entropy over the non-pad targets (its batch mean is the
  mean token cross-entropy; ``exp`` of it is the perplexity);
* ``accuracy``: top-1 accuracy over targets that are not pad, OOV, BOS or
  EOS; TFF's ``accuracy_without_out_of_vocab_or_end_of_sentence``, the
  next-word accuracy Reddi et al. 2021 report for Stack Overflow (BOS never
  is a target in TFF's preprocessing; excluding it changes nothing there);
* ``accuracy_with_eos``: excluding pad, OOV and BOS (TFF's
  ``accuracy_without_out_of_vocab``);
* ``accuracy_with_oov_and_eos``: excluding pad only (TFF's ``accuracy``).
"""

from __future__ import annotations

from fedjax_lab.models.base import (ExampleFn, sequence_accuracy,
                                    sequence_cross_entropy)

# (pad, OOV, BOS, EOS) of TFF's Stack Overflow task with 10,000 words.
STACKOVERFLOW_VOCAB_SIZE = 10_000
STACKOVERFLOW_NUM_IDS = STACKOVERFLOW_VOCAB_SIZE + 4
STACKOVERFLOW_SPECIAL_IDS = (0, STACKOVERFLOW_VOCAB_SIZE + 1,
                             STACKOVERFLOW_VOCAB_SIZE + 2,
                             STACKOVERFLOW_VOCAB_SIZE + 3)


def default_special_ids(num_classes: int, oov_id: int | None = None,
                        bos_id: int | None = None, eos_id: int | None = None
                        ) -> tuple[int, int, int]:
  """``(oov, bos, eos)``; each ``None`` takes TFF's layout, where they are the
  last three of ``num_classes`` ids (``num_classes - 3``, ``- 2``, ``- 1``)."""
  defaults = (num_classes - 3, num_classes - 2, num_classes - 1)
  return tuple(default if given is None else int(given)
               for given, default in zip((oov_id, bos_id, eos_id), defaults))


def check_sequence_args(input_shape: tuple[int, ...], num_classes: int,
                        special_ids: tuple[int, ...],
                        positive: dict[str, int]) -> None:
  """Raises ValueError unless ``input_shape == (T,)``, every value of
  ``positive`` is a positive integer and the special ids are in the vocabulary
  (``num_classes`` ids)."""
  if len(input_shape) != 1 or int(input_shape[0]) <= 0:
    raise ValueError(f"input_shape must be (sequence_length,), got "
                     f"{input_shape!r}")
  for what, value in {"num_classes": num_classes, **positive}.items():
    if int(value) <= 0:
      raise ValueError(f"{what} must be a positive integer, got {value!r}")
  for token in special_ids:
    if not 0 <= token < num_classes:
      raise ValueError(f"special token id {token} outside vocabulary of "
                       f"size {num_classes}")


def next_token_functions(pad_id: int, oov_id: int, bos_id: int, eos_id: int
                         ) -> tuple[ExampleFn, dict[str, ExampleFn]]:
  """``(example_loss, example_metrics)`` of a next-token model (see the
  module docstring for what each counts)."""
  loss = sequence_cross_entropy(ignore_ids=(pad_id,))
  metrics = {
      "accuracy": sequence_accuracy(
          ignore_ids=(pad_id, oov_id, bos_id, eos_id)),
      "accuracy_with_eos": sequence_accuracy(
          ignore_ids=(pad_id, oov_id, bos_id)),
      "accuracy_with_oov_and_eos": sequence_accuracy(ignore_ids=(pad_id,)),
  }
  return loss, metrics
