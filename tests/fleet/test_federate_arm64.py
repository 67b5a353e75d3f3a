"""An emulated Raspberry Pi takes part in federated training (issue 15 item 3).

device-2 runs `nmoe agent --data --trainer numpy` as an aarch64 program under qemu-user (Cortex-A72, the
cached environment of scripts/arm64_env.sh: no torch there) next to two x86 torch-free agents, over a real
mosquitto; Stage 1 comes from an `nmoe train` run (`--stage1-from`). The same fleet then runs with every
agent on x86. A spy records device-2's RESULTs in both runs: its Stage 2-3 updates (the FedGate body it
publishes) and metrics on aarch64 equal the x86 ones within 1e-6. Emulation is slow (the aarch64 agent's
start, its rounds and its bundle rebuild take ~30 s at load 4 on 2 cores): this checks correctness on ARM,
not speed.
"""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from absent_packages import subprocess_env
from test_federate_memory import ResultLog, small_config
from test_federate_numpy import FAST, TOLERANCE

from broker.process import BrokerOptions, start_broker
from device_agent.wire.mqtt_transport import BrokerUrl, MqttSettings, MqttTransport
from device_agent.wire.protocol import Topics
from device_agent.wire.training_frames import Op, Result
from device_agent.wire.transport import ConnectionEvent
from toolkit.arm64_env import emulated_command, ensure_env
from toolkit.fleet.agent_processes import AgentLaunch, AgentProcesses
from toolkit.fleet.device_data_files import write_fleet_data
from toolkit.fleet.federate import FederateOptions, federate
from toolkit.rundir import train

PI = "device-2"
UPDATE_ATOL = 1e-6  # the bound for the aarch64 update against the x86 one
# Runs the agent module like `python -m`, after writing platform.machine() and every torch module this process
# loaded to the file named by NMOE_TEST_MACHINE (at exit).
RECORDED = r"""
import atexit, json, os, platform, runpy, sys
atexit.register(lambda: open(os.environ["NMOE_TEST_MACHINE"], "w").write(json.dumps({
    "machine": platform.machine(), "torch": sorted(m for m in sys.modules if m.partition(".")[0] == "torch")})))
sys.argv = [sys.argv[2], *sys.argv[3:]]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""
CONFIG = (FAST, 'gate.methods=["fedgate"]')


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("sim") / "run"
    return out, train(small_config(*CONFIG), out, show_progress=False)


def _launch(device: str, data: Path, work: Path, url: str, arm64: bool) -> AgentLaunch:
    machine_file = work / "logs" / f"{device}.machine.json"
    if arm64:
        prefix, env = emulated_command(ensure_env(), "cortex-a72")
    else:
        prefix, env = [sys.executable], subprocess_env()
    return AgentLaunch(device, ("--data", str(data), "--state", str(work / "state" / device), "--broker", url,
                                "--trainer", "numpy", "--events", str(work / "logs" / f"{device}.jsonl")),
                       work / "logs" / f"{device}.log", python=(*prefix, "-c", RECORDED),
                       env={**env, "NMOE_TEST_MACHINE": str(machine_file)})


def _fleet_run(work: Path, source: Path, pi_on_arm64: bool) -> tuple[dict, list[Result], dict]:
    """`nmoe federate` through three torch-free agents; (metrics, device-2's RESULTs, device-2's machine record)."""
    cfg = small_config(*CONFIG)
    data = write_fleet_data(cfg, work / "data")
    log = ResultLog(PI)
    with start_broker(BrokerOptions(work / "fleet", port=0)) as broker, AgentProcesses() as agents:
        url = BrokerUrl.parse(broker.url)
        spy = MqttTransport(MqttSettings(url, "spy"))
        spy.subscribe(Topics("nmoe", "default").train_result(PI), qos=1)
        connected = threading.Event()
        spy.connect(None, log.deliver,
                    lambda event, _detail: connected.set() if event == ConnectionEvent.CONNECTED else None)
        try:
            assert connected.wait(10)  # subscribed before any agent starts
            for c in range(3):
                agents.start(_launch(f"device-{c}", data[c], work, broker.url, pi_on_arm64 and c == 2))
            metrics = federate(cfg, work / "run", MqttTransport(MqttSettings(url, "default-coordinator")),
                               FederateOptions(wait_s=300, show_progress=False, commit_precisions=("fp32",),
                                               stage1_from=source))
            assert agents.exited() == {}
            stopped = agents.stop(timeout_s=30)
        finally:
            spy.close()
    assert set(stopped.values()) == {0}, stopped
    machine = json.loads((work / "logs" / f"{PI}.machine.json").read_text())
    return metrics, log.results, machine


def _by_task(results: list[Result]) -> dict[tuple[str, str, int], Result]:
    """device-2's RESULTs by (op, job, round) (a redelivered one counts once)."""
    return {(r.op.value, r.job, r.round): r for r in results}


def test_an_emulated_aarch64_agent_trains_stage3_rounds_and_its_updates_equal_x86(
        tmp_path: Path, source: tuple[Path, dict]) -> None:
    run, sim = source
    on_arm, pi_results, pi_machine = _fleet_run(tmp_path / "arm64", run, pi_on_arm64=True)
    on_x86, x86_results, x86_machine = _fleet_run(tmp_path / "x86", run, pi_on_arm64=False)
    assert pi_machine == {"machine": "aarch64", "torch": []}
    assert x86_machine["machine"] == "x86_64"

    arm, x86 = _by_task(pi_results), _by_task(x86_results)
    assert arm.keys() == x86.keys()
    fits = [k for k in arm if k[0] == Op.FIT.value and k[1].startswith("stage3_")]
    assert len(fits) == small_config(*CONFIG).gate.rounds  # the Pi delivered every FedGate round
    worst = 0.0
    for key, mine in arm.items():
        theirs = x86[key]
        assert mine.status == theirs.status == "ok", (key, mine.error)
        assert mine.num_examples == theirs.num_examples, key
        assert mine.tensors.keys() == theirs.tensors.keys(), key
        for name, value in mine.tensors.items():
            worst = max(worst, float(np.max(np.abs(value.astype(np.float64) - theirs.tensors[name]))))
        for name, value in mine.metrics.items():
            if name.endswith("_s"):  # seconds (the rebuild's): emulation is slow
                continue
            assert value == pytest.approx(theirs.metrics[name], abs=UPDATE_ATOL), (key, name)
    assert all(arm[k].tensors for k in fits)  # the gate body crossed; its final layer never does
    assert not any(n.startswith("final.") for k in fits for n in arm[k].tensors)
    print(f"aarch64 vs x86 update: max abs diff {worst:.2e} over {len(fits)} FedGate rounds")
    assert worst <= UPDATE_ATOL

    for name, expected in sim["methods"].items():
        for key in ("personalized_accuracy", "global_accuracy"):
            assert abs(on_arm["methods"][name][key] - expected[key]) <= TOLERANCE, (name, key)
            assert on_arm["methods"][name][key] == on_x86["methods"][name][key], (name, key)
