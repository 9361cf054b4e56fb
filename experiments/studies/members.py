"""Running one member of a study, or reading it back if it already finished.

Every study (``fedprox_synthetic``, ``compare_algorithms``, ``dp_tradeoff``)
trains its members in their own workdirs and is resumable: a member with a
``summary.json`` (or a divergence marker) is read back, not rerun; a member
interrupted before finishing starts again from an empty workdir.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
from typing import Any, Callable

SUMMARY_FILE = "summary.json"


@dataclasses.dataclass(frozen=True)
class MemberRun:
  """One member's outcome.

  ``summary``: the run's ``summary.json`` (for a diverged member, the record
  written in its place); ``ran``: whether this call trained it (False: read
  back); ``diverged``: whether training stopped on a non-finite loss.
  """

  summary: dict[str, Any]
  ran: bool
  diverged: bool = False


def _read_json(path: str) -> Any:
  with open(path) as f:
    return json.load(f)


def _write_json(path: str, obj: Any) -> None:
  from fedjax_lab.training import metrics_io  # pylint: disable=g-import-not-at-top
  metrics_io.write_json(path, obj)


def run_or_read_back(
    config: Any, workdir: str, *,
    diverged_file: str | None = None,
    diverged_record: Callable[[str], dict[str, Any]] = (
        lambda message: {"diverged": True, "error": message}),
    keep_final_state: bool = True, keep_checkpoints: bool = True,
    announce: str | None = None) -> MemberRun:
  """Trains ``config`` in ``workdir`` unless a finished run is there.

  Args:
    config: the member's experiment config (``ml_collections.ConfigDict``).
    workdir: the member's folder.
    diverged_file: where a diverged member is recorded (its name in
      ``workdir``, e.g. ``summary.json`` or ``diverged.json``), so that it
      counts as finished; None: a diverged run raises
      ``loop.DivergedError``.
    diverged_record: the JSON written there, given the error's message.
    keep_final_state: False deletes the binary final state after training.
    keep_checkpoints: False deletes the ``checkpoints/`` folder after
      training (binary run artefacts stay out of committed results).
    announce: printed to stderr when the member is trained (not read back).

  Returns:
    The member's summary and whether it was trained now.
  """
  from fedjax_lab.training import loop, setup  # pylint: disable=g-import-not-at-top
  summary_path = os.path.join(workdir, SUMMARY_FILE)
  marker = diverged_file and os.path.join(workdir, diverged_file)
  if marker and os.path.exists(marker):
    record = _read_json(marker)
    return MemberRun(record, False, diverged=marker != summary_path or bool(
        record.get("diverged")))
  if os.path.exists(summary_path):
    return MemberRun(_read_json(summary_path), False)
  if os.path.exists(workdir):  # an interrupted member: start it again
    shutil.rmtree(workdir)
  if announce:
    print(announce, file=sys.stderr, flush=True)
  diverged = False
  try:
    summary = loop.run_experiment(setup.build_experiment(config), workdir,
                                  show_progress=False)
  except loop.DivergedError as error:
    if marker is None:
      raise
    summary, diverged = diverged_record(str(error)), True
    os.makedirs(workdir, exist_ok=True)
    _write_json(marker, summary)
  if not keep_final_state:
    state_path = os.path.join(workdir, loop.FINAL_STATE_FILE)
    if os.path.exists(state_path):
      os.remove(state_path)
  if not keep_checkpoints:
    shutil.rmtree(os.path.join(workdir, "checkpoints"), ignore_errors=True)
  return MemberRun(summary, True, diverged)
