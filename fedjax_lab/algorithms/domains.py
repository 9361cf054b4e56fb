"""Agnostic FL's domains: which domain every client belongs to.

Mohri, Sivek & Suresh, "Agnostic Federated Learning", ICML 2019 train for the
worst mixture of client domains (:mod:`fedjax_lab.algorithms.agnostic`);
here every training client is put in exactly one domain (Shakespeare's play,
its majority label or a client-id prefix), and the population's domain shares
give a prior for the cohort-share window.
"""

from __future__ import annotations

import numpy as np

from fedjax_lab.data.federated import FederatedDataset

DOMAIN_KINDS = ("play", "majority_label", "client_id_prefix")


def client_domain_states(domain_ids, num_domains: int | None = None
                         ) -> np.ndarray:
  """Every client's persistent state: its domain id, int32 ``[num_clients]``.

  Pass it as the stacked client states of the run (the engine's per-client
  store gathers and scatters it; the algorithm returns it unchanged).

  Raises:
    ValueError: ids not 1-D, negative, or ``>= num_domains``.
  """
  ids = np.asarray(domain_ids)
  if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
    raise ValueError(f"domain_ids must be a 1-D integer array, got shape "
                     f"{ids.shape} and dtype {ids.dtype}.")
  if ids.size and ids.min() < 0:
    raise ValueError("domain ids must be >= 0.")
  if num_domains is not None and ids.size and ids.max() >= num_domains:
    raise ValueError(f"domain id {ids.max()} >= num_domains={num_domains}.")
  return ids.astype(np.int32)


def _index_names(keys: np.ndarray) -> tuple[np.ndarray, tuple[str, ...]]:
  names, ids = np.unique(keys, return_inverse=True)
  return ids.astype(np.int32), tuple(str(n) for n in names)


def domain_ids_from(dataset: FederatedDataset, kind: str,
                    separator: str = "/", num_labels: int | None = None
                    ) -> tuple[np.ndarray, tuple[str, ...]]:
  """Assigns every training client of ``dataset`` to one domain.

  Args:
    dataset: the federated dataset (its train store's clients, in order).
    kind: ``"play"``: Shakespeare's play, the part of the client id before
      ``separator`` (ids look like ``"hamlet/HAMLET"``; every id must contain
      it); ``"majority_label"``: the client's most frequent training label
      (ties: the smallest; integer labels ``y [N]``, e.g. mnist, digits,
      synthetic); ``"client_id_prefix"``: the part of the id before the
      first ``separator`` (the whole id if absent).
    separator: the prefix separator for ``"play"`` / ``"client_id_prefix"``.
    num_labels: ``"majority_label"`` only: number domains by label,
      ``D = num_labels`` whatever the clients' labels are (a DP run: which
      labels are some client's majority is private, so it must not set the
      number of domains or their numbering).

  Returns:
    ``(domain_ids, names)``: int32 ``[num_clients]`` ids in ``[0, D)`` and the
    ``D`` domain names, sorted (labels as ``"label_<y>"``). Without
    ``num_labels`` only domains that some client belongs to are numbered.

  Raises:
    ValueError: unknown ``kind``, a ``"play"`` id without ``separator``, or
      labels unsuitable for ``"majority_label"``.
  """
  store = dataset.train
  ids = [str(i) for i in store.client_ids]
  if kind in ("play", "client_id_prefix"):
    if kind == "play":
      missing = [i for i in ids if separator not in i]
      if missing:
        raise ValueError(f"kind='play' needs client ids '<play>{separator}"
                         f"<speaker>', got e.g. {missing[0]!r}.")
    return _index_names(np.asarray([i.split(separator, 1)[0] for i in ids]))
  if kind == "majority_label":
    labels = np.asarray(store.features["y"])
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
      raise ValueError("kind='majority_label' needs integer class labels y "
                       f"[N], got shape {labels.shape} ({labels.dtype}).")
    owner = np.repeat(np.arange(store.num_clients), store.client_sizes)
    width = int(labels.max(initial=0)) + 1
    if num_labels is not None:
      if width > num_labels:
        raise ValueError(f"labels go up to {width - 1} but num_labels is "
                         f"{num_labels}.")
      width = num_labels
    counts = np.zeros([store.num_clients, width], np.int64)
    np.add.at(counts, (owner, labels), 1)
    majority = np.argmax(counts, axis=1)
    if num_labels is not None:
      return (majority.astype(np.int32),
              tuple(f"label_{u}" for u in range(num_labels)))
    domain_ids, used = _index_names(majority)
    return domain_ids, tuple(f"label_{u}" for u in used)
  raise ValueError(f"kind must be one of {DOMAIN_KINDS}, got {kind!r}.")


def domain_fractions(domain_ids, num_domains: int,
                     client_sizes=None) -> np.ndarray:
  """Population share of each domain, float64 ``[D]`` summing to 1.

  Shares of examples when ``client_sizes`` is given (``num_examples``
  weighting), else of clients. A sensible ``init_domain_window`` prior.
  """
  ids = client_domain_states(domain_ids, num_domains)
  sizes = (np.ones(len(ids)) if client_sizes is None
           else np.asarray(client_sizes, np.float64))
  totals = np.bincount(ids, weights=sizes, minlength=num_domains)
  return totals / max(totals.sum(), 1e-12)
