"""PersonalizationResult.summary: the distribution over clients, before and
after fine-tuning, exactly as numpy computes it."""

import numpy as np
import pytest

from fedjax_lab.evaluation.personalization_report import PersonalizationResult
from fedjax_lab.evaluation.personalization_report import lower_is_better


def test_summary_matches_numpy():
  rng = np.random.default_rng(0)
  num_clients = 23
  before = rng.uniform(size=num_clients)
  after = before + rng.normal(scale=0.2, size=num_clients)
  after[:3] = before[:3]  # ties are not improvements
  loss_before, loss_after = rng.uniform(1, 3, num_clients), rng.uniform(
      0, 3, num_clients)
  weights = rng.integers(1, 50, num_clients).astype(np.float64)
  result = PersonalizationResult(
      client_ids=np.array([str(i) for i in range(num_clients)]),
      client_indices=np.arange(num_clients),
      num_train_examples=weights * 4, num_test_examples=weights,
      num_fine_tune_steps=np.ones(num_clients, np.int64),
      global_metrics={"loss": loss_before, "accuracy": before},
      personalized_metrics={"loss": loss_after, "accuracy": after},
      metric_weights={"loss": weights, "accuracy": weights},
      num_skipped_no_test_examples=2)
  summary = result.summary()
  for prefix, acc, loss in (("global", before, loss_before),
                            ("personalized", after, loss_after)):
    assert summary[f"{prefix}_accuracy_p10"] == pytest.approx(
        np.percentile(acc, 10))
    assert summary[f"{prefix}_accuracy_median"] == pytest.approx(
        np.median(acc))
    assert summary[f"{prefix}_accuracy_worst"] == acc.min()
    assert summary[f"{prefix}_accuracy_mean_client_uniform"] == pytest.approx(
        acc.mean())
    assert summary[f"{prefix}_accuracy_mean_example_weighted"] == (
        pytest.approx(np.average(acc, weights=weights)))
    assert summary[f"{prefix}_loss_p90"] == pytest.approx(
        np.percentile(loss, 90))
    assert summary[f"{prefix}_loss_worst"] == loss.max()
  assert summary["fraction_clients_improved_accuracy"] == pytest.approx(
      np.mean(after > before))
  assert summary["fraction_clients_worse_accuracy"] == pytest.approx(
      np.mean(after < before))
  assert (summary["fraction_clients_improved_accuracy"] +
          summary["fraction_clients_worse_accuracy"]) == pytest.approx(20 / 23)
  assert summary["fraction_clients_improved_loss"] == pytest.approx(
      np.mean(loss_after < loss_before))
  assert summary["num_clients_evaluated"] == num_clients
  assert summary["num_clients_skipped_no_test_examples"] == 2
  assert "global_loss_p10" not in summary


@pytest.mark.parametrize("name, lower", [
    ("loss", True), ("perplexity", True), ("sequence_loss", True),
    ("accuracy", False), ("sequence_accuracy", False)])
def test_lower_is_better(name, lower):
  assert lower_is_better(name) == lower


def test_summary_of_no_clients_only_counts():
  empty = np.zeros([0])
  result = PersonalizationResult(
      client_ids=np.array([], str), client_indices=empty.astype(np.int64),
      num_train_examples=empty, num_test_examples=empty,
      num_fine_tune_steps=empty.astype(np.int64), global_metrics={},
      personalized_metrics={}, metric_weights={},
      num_skipped_no_test_examples=3)
  assert result.summary() == {"num_clients_evaluated": 0.0,
                              "num_clients_skipped_no_test_examples": 3.0}
