"""`nmoe trial --federate CONFIG`: train a fleet of agent processes over MQTT, then run the inference trial
on the models they committed. One command, a whole field trial (docs/federated.md).

1. OUT/train/: a mosquitto of its own (with --auth: one account per device and `coordinator`), each
   client's partition as a device data file, one `nmoe agent --data` process per client;
2. `nmoe federate` in this process into OUT/run/ (the run dir contract of `nmoe train`), ending with
   the commit: every device rebuilds its bundle and serves it;
3. the devices' bundles are copied to OUT/bundles/device-<c>/ and the training fleet stops;
4. the usual trial (toolkit.fleet.trial) on OUT/bundles into OUT.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from broker.accounts import FleetCredential, fleet_accounts
from broker.process import BrokerOptions, RunningBroker, start_broker
from device_agent.training_service import BUNDLE_DIR
from device_agent.wire.mqtt_transport import BrokerUrl, MqttSettings, MqttTransport
from device_agent.wire.training_link import COORDINATOR
from toolkit.config import Config
from toolkit.fleet.agent_processes import AgentLaunch, AgentProcesses
from toolkit.fleet.device_data_files import write_fleet_data
from toolkit.fleet.federate import FederateError, FederateOptions, federate
from toolkit.fleet.trial import login_args
from toolkit.fleet.trial_driver import TrialError


def training_launches(data: list[Path], work: Path, broker: RunningBroker) -> list[AgentLaunch]:
    """One `nmoe agent --data --trainer torch` per device data file (device-<c>), its state, events and log under
    `work`, logged in to `broker` as its device when the broker has accounts."""
    (work / "events").mkdir(parents=True, exist_ok=True)
    launches = []
    for c, path in enumerate(data):
        device = f"device-{c}"
        args = ("--data", str(path), "--state", str(work / "state" / device), "--trainer", "torch",
                "--broker", broker.url, "--events", str(work / "events" / f"{device}.jsonl"),
                *login_args(broker.credentials.get(device) or FleetCredential(device)))
        launches.append(AgentLaunch(device, args, work / "logs" / f"{device}.log"))
    return launches


def train_fleet(cfg: Config, out: Path, *, auth: bool, show_progress: bool) -> Path:
    """Train `cfg` through agent processes (steps 1-3 of the module docstring); the bundles' folder."""
    n, work = cfg.data.num_clients, out / "train"
    data = write_fleet_data(cfg, work / "data")
    options = BrokerOptions(work / "fleet", port=0, auth=auth, accounts=fleet_accounts(n))
    with start_broker(options) as broker, AgentProcesses() as agents:
        for launch in training_launches(data, work, broker):
            agents.start(launch)
        login = broker.credentials.get(COORDINATOR)
        password = None if login is None else login.password()
        transport = MqttTransport(MqttSettings(BrokerUrl.parse(broker.url), COORDINATOR,
                                               None if password is None else COORDINATOR, password))
        def alive() -> None:
            if dead := agents.exited():
                raise TrialError(f"agents exited before training: {dead} (logs in {work / 'logs'})")

        try:
            metrics = federate(cfg, out / "run", transport, FederateOptions(wait_s=180, show_progress=show_progress),
                               check=alive)
        except FederateError as e:
            raise TrialError(f"federated training: {e} (agent logs in {work / 'logs'})") from None
        dead = agents.exited()
        if dead:
            raise TrialError(f"agents exited during training: {dead} (logs in {work / 'logs'})")
    bundles = out / "bundles"
    shutil.rmtree(bundles, ignore_errors=True)
    for c in range(n):
        shutil.copytree(work / "state" / f"device-{c}" / BUNDLE_DIR, bundles / f"device-{c}")
    committed = metrics["fleet"]["committed"]
    print(f"nmoe trial: federated {committed['method']} on {n} agents, model version {committed['model_version']}; "
          f"run dir {out / 'run'}")
    return bundles
