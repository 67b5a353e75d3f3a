"""The trial's summary arithmetic on a hand-made record: every count, rate, percentile and join."""

import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from device_agent.nmoe_local import Prediction
from toolkit.fleet.trial import TrialOptions
from toolkit.fleet.trial_cli import _healthy
from toolkit.fleet.trial_driver import PresenceChange, Request, RequestStatus
from toolkit.fleet.trial_record import TrialFacts, TrialRecord
from toolkit.fleet.trial_report import render_html, summary_text
from toolkit.fleet.trial_summary import (
    Accuracy,
    ExactnessCounts,
    Failure,
    RequestPath,
    Stats,
    TrialSummary,
    read_events,
    summarize,
)

S = RequestStatus


def request(device: str, index: int, label: int, status: RequestStatus, *, sent: bool = True, predicted: int | None = None,
            diff: float = 0.0, rtt: float | None = None, detail: str = "", request_bytes: int = 100) -> Request:
    """A request as the driver leaves it; an answer's probabilities differ from LocalNMoE's (zeros) by `diff`."""
    r = Request(device, index, label, sent_s=0.1 * index, id=f"{device}-{index}" if sent else "", status=status,
                detail=detail, predicted=predicted, rtt_ms=rtt, request_bytes=request_bytes if sent else 0)
    if status == S.ANSWERED:
        r.probs, r.reply_bytes = np.array([diff, 0, 0, 0], np.float32), 40
    return r


def inference(ids: list[str], answered: list[int], total_ms: float, sent: int, received: int, **extra: object) -> dict:
    """An agent's `inference` event for one input."""
    return {"event": "inference", "inputs": 1, "answered": answered, "missing": {}, "rerouted": {}, "fallback_rows": 0,
            "zero_weight_skipped": 0, "avoided": [], "latency_ms": {"total": total_ms}, "bytes_sent": sent,
            "bytes_received": received, "requests": {i: answered for i in ids}, **extra}


def expected(labels: list[int]) -> Prediction:
    n = len(labels)
    return Prediction(np.array(labels), np.zeros((n, 4), np.float32), np.zeros((n, 2), np.int64),
                      np.full((n, 2), 0.5, np.float32))


@pytest.fixture
def record(tmp_path: Path) -> TrialRecord:
    events = tmp_path / "events"
    events.mkdir()
    d0 = [inference(["device-0-0"], [0, 1], 4, 100, 60), inference(["device-0-1"], [0, 1], 6, 100, 60),
          inference([], [0], 1, 999, 999, rerouted={"1": 2}),  # the agent's own inference: no driver request
          {"event": "counters", "counters": {"inferences": 3}}]
    d1 = [inference(["device-1-0"], [1], 8, 50, 0, missing={"0": "timeout"}),
          inference(["device-1-1"], [1], 10, 70, 0, missing={"0": "busy"}, fallback_rows=1)]
    (events / "device-0.jsonl").write_text("".join(json.dumps(e) + "\n" for e in d0))
    (events / "device-1.jsonl").write_text("".join(json.dumps(e) + "\n" for e in d1) + '{"event": "infer')  # torn
    requests = [
        request("device-0", 0, 0, S.ANSWERED, predicted=0, diff=0.001, rtt=10),
        request("device-0", 1, 1, S.ANSWERED, predicted=2, diff=0.5, rtt=20),  # a mismatch, every expert answered
        request("device-0", 2, 2, S.ERROR, detail="busy"),
        request("device-0", 3, 3, S.TIMEOUT),
        request("device-0", 4, 0, S.INTERRUPTED, request_bytes=200),
        request("device-1", 0, 1, S.ANSWERED, predicted=1, rtt=30),  # a peer missing: local path, degraded
        request("device-1", 1, 1, S.ANSWERED, predicted=0, diff=0.25, rtt=40),  # a mismatch, degraded
        request("device-1", 2, 0, S.ANSWERED, predicted=0, diff=0.125, rtt=50),  # no agent event names it
        request("device-1", 3, 0, S.NOT_SERVED, sent=False),
    ]
    facts = TrialFacts(planned=11, broker="mqtt://127.0.0.1:1", broker_pids=[7], pids={"device-0": 8, "device-1": 9},
                       online_s=1.5, feeding_s=0.9, killed={"device-1": 0.3}, exit_status={"device-0": 0, "device-1": -9})
    presence = [PresenceChange(0.2, "device-1", "offline"), PresenceChange(0.31, "device-1", "offline"),
                PresenceChange(0.35, "device-0", "offline")]
    return TrialRecord(TrialOptions(Path("b"), Path("o"), samples=5, kill_device="device-1", kill_after=0.3),
                       {"device-0": 0, "device-1": 1}, 2, 4, "fp32", Path("run"), "nmoe_x", "m" * 64,
                       {"device-0": np.array([0, 1, 2, 3, 0]), "device-1": np.array([1, 1, 0, 0])},
                       {"device-0": expected([0, 1, 2, 0, 0]), "device-1": expected([1, 1, 0, 1])},
                       requests, presence, facts, {"wrong_sender": 1}, events)


def test_counts_accuracy_and_exactness(record: TrialRecord) -> None:
    s = summarize(record)
    c = s.counts
    assert (c.planned, c.sent, c.answered, c.failed, c.not_served, c.interrupted, c.not_sent) == (11, 8, 5, 2, 1, 1, 2)
    assert c.failures_by_reason == {"busy": 1, "timeout": 1}
    assert s.failures == [Failure("device-0", 2, S.ERROR, "busy", 0.2), Failure("device-0", 3, S.TIMEOUT, "", 0.3)]
    assert s.accuracy.per_device == {"device-0": Accuracy(2, 5, 50.0, 100.0, 80.0),
                                     "device-1": Accuracy(3, 4, 66.67, 100.0, 75.0)}
    assert s.accuracy.overall == Accuracy(5, 9, 60.0, 100.0, 77.78)
    x = s.exactness
    assert (x.compared, x.mismatches, x.mismatches_intact, x.degraded, x.max_abs_prob_diff, x.unverified,
            x.mismatches_unverified, x.exact) == (5, 2, 1, 2, 0.5, 1, 0, False)
    assert x.per_device == {"device-0": ExactnessCounts(2, 1, 1, 0, 0.5, 0, 0),
                            "device-1": ExactnessCounts(3, 1, 0, 2, 0.25, 1, 0)}


def test_paths_latency_bytes_and_routing(record: TrialRecord) -> None:
    s = summarize(record)
    rows = {(r.device, r.index): r for r in s.requests}
    assert [rows[k].path for k in (("device-0", 0), ("device-1", 0), ("device-1", 2))] == \
        [RequestPath.REMOTE, RequestPath.LOCAL, RequestPath.UNKNOWN]
    assert [rows[k].intact for k in (("device-0", 1), ("device-1", 0), ("device-1", 2))] == [True, False, None]
    assert rows["device-0", 0].agent_ms == 4 and rows["device-1", 2].agent_ms is None
    e2e = s.latency_ms.end_to_end
    assert e2e.all == Stats(5, 30.0, 30.0, 48.0, 49.6)
    assert (e2e.remote.n, e2e.remote.median, e2e.local.n, e2e.local.median) == (2, 15.0, 2, 35.0)
    assert s.latency_ms.agent.all == Stats(4, 7.0, 7.0, 9.7, 9.94)
    b = s.bytes
    assert (b.raw_input, b.app_request, b.app_reply) == (4, 112.5, 40.0)
    per = b.between_agents_per_inference
    assert (per.local, per.remote, per.all) == (60.0, 160.0, 110.0)  # the agent's own inference not counted
    assert s.routing.experts == [0, 1] and s.routing.matrix == {"device-0": [2, 2], "device-1": [0, 2]}
    r = s.reroutes
    assert (r.inputs_rerouted, r.per_device, r.experts_missing, r.fallback_rows) == \
        (2, {"device-0": 2, "device-1": 0}, {"timeout": 1, "busy": 1}, 1)


def test_zero_weight_skips_and_suspect_experts_avoided_are_counted_and_shown(record: TrialRecord) -> None:
    web_device = {k: v for k, v in inference([], [1], 3, 0, 0).items() if k not in ("zero_weight_skipped", "avoided")}
    more = {"device-0": [inference([], [0], 3, 0, 0, inputs=3, zero_weight_skipped=2, avoided=[1])],
            "device-1": [inference([], [1], 3, 0, 0, zero_weight_skipped=1, avoided=[0]),
                         inference([], [1], 3, 0, 0, avoided=[0]), web_device]}  # the web device writes neither key
    for device, events in more.items():
        with (record.events_dir / f"{device}.jsonl").open("a") as f:
            f.write("\n" + "".join(json.dumps(e) + "\n" for e in events))  # after device-1's torn line
    r = summarize(record).reroutes
    assert (r.zero_weight_skipped, r.zero_weight_skipped_per_device, r.avoided) == \
        (3, {"device-0": 2, "device-1": 1}, {"0": 2, "1": 1})
    s = summarize(record)
    assert "peers not asked because their gate weight is exactly 0: 3 (input, expert) pairs" in summary_text(s)
    assert ("left out of routing while their device was suspect: expert 0 in 2 inference(s), expert 1 in 1 "
            "inference(s)") in summary_text(s)
    page = render_html(s)
    assert "<td>(input, peer expert) pairs not asked: gate weight exactly 0</td><td>3</td>" in page
    assert "<td>inferences that left expert 0 out of routing: its device was suspect</td><td>2</td>" in page
    j = json.loads(json.dumps(s.to_json()))["reroutes"]
    assert (j["zero_weight_skipped"], j["zero_weight_skipped_per_device"], j["avoided"]) == \
        (3, {"device-0": 2, "device-1": 1}, {"0": 2, "1": 1})


def test_timing_agents_fleet_and_driver(record: TrialRecord) -> None:
    s = summarize(record)
    kill, = s.timing.kills
    assert (kill.device, kill.at_s, kill.offline_after_ms) == ("device-1", 0.3, 10.0)  # the first offline after it
    assert (s.timing.agents_online_s, s.timing.feeding_s, s.timing.interrupted) == (1.5, 0.9, False)
    a0, a1 = s.agents["device-0"], s.agents["device-1"]
    assert (a0.expert, a0.exit_status, a0.inferences, a0.counters) == (0, 0, 3, {"inferences": 3})
    assert (a1.expert, a1.exit_status, a1.inferences, a1.counters) == (1, -9, 2, None)
    f = s.fleet
    assert (f.broker, f.pids, f.broker_pids, f.samples, f.run_dir, f.method) == \
        ("mqtt://127.0.0.1:1", {"device-0": 8, "device-1": 9}, [7], 5, "run", "nmoe_x")
    assert f.options["bundles"] == "b" and f.options["kill_after"] == 0.3
    assert s.driver == {"wrong_sender": 1}


def test_trial_json_is_plain_json_with_the_documented_sections(record: TrialRecord, tmp_path: Path) -> None:
    j = json.loads(json.dumps(summarize(record).to_json()))
    assert j["version"] == 2
    assert list(j) == ["version", "fleet", "timing", "counts", "accuracy", "exactness", "latency_ms", "bytes", "routing",
                       "reroutes", "failures", "agents", "driver", "requests"]
    assert j["requests"][0] == {
        "device": "device-0", "index": 0, "label": 0, "status": "answered", "detail": "", "predicted": 0, "expected": 0,
        "prob_diff": 0.001, "path": "remote", "answered": [0, 1], "intact": True, "sent_s": 0.0, "rtt_ms": 10,
        "agent_ms": 4, "request_bytes": 100, "reply_bytes": 40, "id": "device-0-0"}
    assert j["latency_ms"]["end_to_end"]["local"] == {"n": 2, "mean": 35.0, "median": 35.0, "p95": 39.5, "p99": 39.9}
    assert j["exactness"]["per_device"]["device-1"] == {"compared": 3, "mismatches": 1, "mismatches_intact": 0,
                                                        "degraded": 2, "max_abs_prob_diff": 0.25, "unverified": 1,
                                                        "mismatches_unverified": 0}
    assert j["requests"][7]["intact"] is None and (j["fleet"]["remote"], j["fleet"]["absent"]) == (False, {})
    assert j["failures"][1] == {"device": "device-0", "index": 3, "status": "timeout", "detail": "", "sent_s": 0.3}


def test_text_and_page_show_the_numbers(record: TrialRecord) -> None:
    s = summarize(record)
    text = summary_text(s)
    assert "answered 5/8 sent, failed 2, not served 1\n" in text
    assert ("exactness vs LocalNMoE: 2 mismatch(es) in 5 (1 among the 2 with every chosen expert answering, 0 among "
            "the 1 no agent event describes)") in text
    assert "local 35.00/39.50/39.90 ms (n=2); remote 15.00/19.50/19.90 ms (n=2); all 30.00/48.00/49.60 ms (n=5)" in text
    assert "absent" not in text
    assert "killed device-1 at 0.30 s; offline presence after 10.00 ms" in text
    page = render_html(replace(s, timing=replace(s.timing, interrupted=True)))
    assert "interrupted 1, not sent 2" in page and len(re.findall(r"src='data:image/png;base64,", page)) == 5
    assert "<td>failed requests: busy</td><td>1</td>" in page


def test_the_exit_verdict_counts_failures_and_fp32_mismatches_among_intact_inputs(record: TrialRecord) -> None:
    s = summarize(record)
    assert not _healthy(s)  # 2 failed, 1 mismatch among intact inputs
    no_failures = replace(s, counts=replace(s.counts, failed=0))
    assert not _healthy(no_failures)
    assert _healthy(replace(no_failures, exactness=replace(s.exactness, mismatches_intact=0, exact=True)))
    fp16 = replace(no_failures, fleet=replace(s.fleet, latent_encoding="fp16"))
    assert _healthy(fp16)  # fp16 latents may change predictions


def test_a_mismatch_no_agent_event_describes_counts_against_exactness(record: TrialRecord) -> None:
    unverified = record.requests[7]
    assert unverified.id == "device-1-2" and unverified.predicted == 0
    unverified.predicted = 3  # LocalNMoE says 0; no agent event says whether its experts all answered
    fixed = replace(record, requests=[r for r in record.requests if r.id != "device-0-1"])  # the intact mismatch
    x = summarize(fixed).exactness
    assert (x.mismatches, x.mismatches_intact, x.mismatches_unverified, x.exact) == (2, 0, 1, False)
    unverified.predicted = 0
    assert summarize(fixed).exactness.exact


def test_absent_devices_of_a_remote_fleet_are_named_and_fail_the_verdict(record: TrialRecord) -> None:
    remote = replace(record, options=replace(record.options, remote=True, broker="mqtt://h:1"),
                     facts=replace(record.facts, absent={"device-1": "offline"}, killed={}))
    s = summarize(remote)
    assert (s.fleet.remote, s.fleet.absent) == (True, {"device-1": "offline"})
    assert "  absent, not fed: device-1 (offline)" in summary_text(s).splitlines()
    healthy_otherwise = replace(s, counts=replace(s.counts, failed=0),
                                exactness=replace(s.exactness, mismatches_intact=0, exact=True))
    assert not _healthy(healthy_otherwise)
    assert _healthy(replace(healthy_otherwise, fleet=replace(s.fleet, absent={})))


def test_read_events_skips_a_torn_last_line_and_a_missing_file(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text('{"event": "x"}\n{"event": "y"')
    assert read_events(tmp_path / "a.jsonl") == [{"event": "x"}]
    assert read_events(tmp_path / "missing.jsonl") == []


def test_a_summary_without_answers_has_no_numbers_to_invent(record: TrialRecord) -> None:
    nothing = replace(record, requests=[], facts=replace(record.facts, killed={}))
    s: TrialSummary = summarize(nothing)
    assert s.counts.sent == s.counts.answered == 0 and s.counts.not_sent == 11
    assert s.accuracy.overall.accuracy is None and s.accuracy.overall.in_process_accuracy_all == 77.78
    assert s.latency_ms.end_to_end.all == Stats(0, None, None, None, None) and s.exactness.max_abs_prob_diff is None
    assert s.bytes.app_request is None and "-" in summary_text(s)
    render_html(s)  # no figure fails on empty data
