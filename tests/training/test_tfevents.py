"""TensorBoard event encoding without TensorFlow: CRC-32C, TFRecord
framing, and events that TensorBoard's own protos parse."""

import random

import pytest

from fedjax_lab.training import tfevents


@pytest.mark.parametrize("data,expected", [
    (b"", 0x00000000),
    (b"123456789", 0xE3069283),
    (bytes(32), 0x8A9136AA),               # RFC 3720, appendix B.4
    (b"\xff" * 32, 0x62A8AB43),
    (bytes(range(32)), 0x46DD794E),
    (bytes(range(31, -1, -1)), 0x113FDB5C),
])
def test_crc32c_known_vectors(data, expected):
  assert tfevents.crc32c(data) == expected


def test_masked_crc_and_framing_match_tensorboard_reference():
  stub = pytest.importorskip(
      "tensorboard.compat.tensorflow_stub.pywrap_tensorflow")
  rng = random.Random(0)
  for size in (0, 1, 7, 8, 100, 1000):
    data = bytes(rng.getrandbits(8) for _ in range(size))
    assert tfevents.masked_crc32c(data) == stub.masked_crc32c(data)
    record = tfevents.tfrecord(data)
    assert len(record) == 8 + 4 + size + 4
    assert int.from_bytes(record[:8], "little") == size
    assert record[12:12 + size] == data


def test_encoded_event_parses_as_the_tensorboard_proto():
  event_pb2 = pytest.importorskip("tensorboard.compat.proto.event_pb2")
  summary = tfevents.scalar_summary([("eval/accuracy", 0.875),
                                  ("train/loss", -2.5)])
  event = event_pb2.Event.FromString(
      tfevents.encode_event(1234.5, 300, summary=summary))
  assert (event.wall_time, event.step) == (1234.5, 300)
  assert [(v.tag, v.simple_value) for v in event.summary.value] == [
      ("eval/accuracy", 0.875), ("train/loss", -2.5)]
  version = event_pb2.Event.FromString(
      tfevents.encode_event(1.0, 0, file_version="brain.Event:2"))
  assert version.file_version == "brain.Event:2"
  restart = event_pb2.Event.FromString(tfevents.encode_event(
      2.0, -3, session_log_status=tfevents.SESSION_LOG_START))
  assert restart.step == -3  # ten-byte varint of a negative int64
  assert restart.session_log.status == event_pb2.SessionLog.START
