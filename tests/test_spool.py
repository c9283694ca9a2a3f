"""The MLflow spool on its own: order, outages, refusals, torn journals, exactly-once metrics across reopen."""

import json

import numpy as np
import requests
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from clipzss.engine import spool
from clipzss.engine.spool import JOURNAL, REJECTED, Spool, pending_records


class Sink:
    """Records deliveries; fails the first ``outages`` calls with a connection error."""

    uri, run_id = "http://127.0.0.1:9", "run0"

    def __init__(self, outages: int = 0, refuse: str = ""):
        self.calls, self.outages, self.refuse = [], outages, refuse

    def __getattr__(self, op):
        def call(*args, **kwargs):
            if self.outages > 0:
                self.outages -= 1
                raise requests.exceptions.ConnectionError("refused")
            if op == self.refuse:
                raise MlflowException("Changing param values is not allowed", error_code=INVALID_PARAMETER_VALUE)
            self.calls.append((op, args))

        return call


def test_an_outage_is_retried_in_order_and_nothing_is_lost(tmp_path, monkeypatch):
    monkeypatch.setattr(spool, "MAX_BACKOFF", 0.05)
    sink = Sink(outages=3)
    s = Spool(sink, tmp_path)
    s.log_params({"a": "1"})
    s.log_metrics({"loss": 0.5}, 1)
    s.log_image(np.zeros((2, 2, 3), np.uint8), "val", 1)
    s.finish("FINISHED")
    assert s.close(wait=30) == 0
    assert [op for op, _ in sink.calls] == ["log_params", "log_metrics", "log_image", "finish"]
    assert isinstance(sink.calls[2][1][0], np.ndarray) and not any((tmp_path / spool.ARRAYS).iterdir())
    assert pending_records(tmp_path) == 0


def test_a_refused_call_is_set_aside_and_the_queue_goes_on(tmp_path):
    sink = Sink(refuse="log_params")
    s = Spool(sink, tmp_path)
    s.log_params({"optim.lr": "0.1"})
    s.finish("FINISHED")
    assert s.close(wait=10) == 0
    assert [op for op, _ in sink.calls] == ["finish"]
    rejected = json.loads((tmp_path / REJECTED).read_text())
    assert rejected["op"] == "log_params" and "Changing param values" in rejected["error"]


def test_a_server_that_never_answers_costs_a_bounded_wait_and_keeps_every_record(tmp_path):
    s = Spool(Sink(outages=10**9), tmp_path)
    s.log_metrics({"loss": 1.0}, 1)
    s.finish("FINISHED")
    assert s.close(wait=0.5) == 2 and pending_records(tmp_path) == 2


def test_a_torn_journal_line_is_dropped_and_metrics_are_committed_once_per_step(tmp_path):
    first = Spool(Sink(outages=10**9), tmp_path)
    first.log_metrics({"loss": 1.0}, 1)
    first.log_metrics({"loss": 0.9}, 2)
    first.close(wait=0)
    with open(tmp_path / JOURNAL, "a") as f:
        f.write('{"op": "log_metr')  # kill -9 in the middle of a write
    sink = Sink()
    again = Spool(sink, tmp_path, continuing=True)  # a resume recomputes step 2, then goes on
    again.log_metrics({"loss": 0.9, "lr": 0.1}, 2)
    again.log_metrics({"loss": 0.8}, 3)
    again.finish("FINISHED")
    assert again.close(wait=10) == 0
    metrics = [(args[1], sorted(args[0])) for op, args in sink.calls if op == "log_metrics"]
    assert metrics == [(1, ["loss"]), (2, ["loss"]), (2, ["lr"]), (3, ["loss"])]


def test_an_old_status_is_void_once_a_run_is_resumed(tmp_path):
    first = Spool(Sink(outages=10**9), tmp_path)
    first.finish("FINISHED")
    first.close(wait=0)
    sink = Sink()
    again = Spool(sink, tmp_path, continuing=True)
    again.log_metrics({"loss": 0.5}, 5)
    again.finish("KILLED")
    assert again.close(wait=10) == 0
    assert [op for op, _ in sink.calls] == ["log_metrics", "finish"] and sink.calls[-1][1] == ("KILLED",)
