"""`nmoe federate`: train a config's NMoE through the device agents of a fleet (docs/federated.md)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HELP = """\
Federated training on a fleet of device agents over MQTT: the coordinator.

It runs the same three stages, strategies and round loop as `nmoe train`, but every client is a
device agent started with its own data (`nmoe agent --data FILE`, see `nmoe fleet-data` and
docs/federated.md): client c is the device whose presence announces expert c. The coordinator:
  1. waits (--wait) until a device is online for every expert 0..data.num_clients-1;
  2. sets each device up for this run (the resolved config; torch devices use --device-threads);
  3. Stage 1 (fedce | fedsc | hybrid): rounds of COMMANDs with the shared model, sampled from the
     devices online; updates from devices that fail, time out or send bad tensors are left out
     of the round (quorum: federated.min_fit_fraction / min_fit_clients, round_timeout, retries);
  4. Stage 2: every device trains its own expert (it never leaves the device) and serves it to its
     peers, which send it their latents (never their data) to build their gate data;
  5. Stage 3: each gate of gate.methods (FedGate's final layer never leaves the device);
  6. every device evaluates its NMoE: personalized and global accuracy, routing;
  7. commit (--deploy): every device rebuilds its bundle (fp32 and int8 ONNX) with the trained
     models and serves them as one new model version; inference goes on meanwhile.

The run dir has the contract of `nmoe train` (config.json, checkpoints/, run.log, metrics.json,
report.md, plots/), plus fleet.json (run id, devices, traffic, the committed model version) and
coordinator.jsonl. Kill it and run the same command again: it resumes from the last completed
round, and the devices resume with the private state they persisted. The baselines local,
fedavg_ft and centralized are not run on a fleet (the server would need the devices' data).
"""

EPILOG = """\
examples:
  nmoe fleet-data configs/quick.toml --out fleet-data            # each device's partition (.npz)
  nmoe broker --auth --devices 4 &                                # or any MQTT broker
  nmoe agent --data fleet-data/device-0.npz --state state/0 --broker mqtt://127.0.0.1:1883 ...  # x4
  nmoe federate configs/quick.toml --out runs/fed --broker mqtt://127.0.0.1:1883 --auth --fleet-dir fleet
  nmoe results runs/fed
  nmoe train configs/quick.toml --out runs/sim && nmoe federate configs/quick.toml --stage1-from runs/sim ...
                                                                  # devices without torch: Stages 2-3 only
"""


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `nmoe federate` and `nmoe fleet-data`."""
    p = subparsers.add_parser("federate", help="federated training through device agents over MQTT (coordinator)",
                              description=HELP, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", type=Path, help="TOML config, as for nmoe train")
    p.add_argument("--out", required=True, type=Path, help="run dir (created; an existing one of the same config resumes)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key (repeatable)")
    p.add_argument("--broker", default="mqtt://127.0.0.1:1883", metavar="URL", help="mqtt:// or mqtts:// (default: %(default)s)")
    p.add_argument("--auth", action="store_true",
                   help="log in as `coordinator` with the password `nmoe broker --auth` keeps in --fleet-dir")
    p.add_argument("--fleet-dir", type=Path, default=Path("fleet"), metavar="DIR", help="with --auth (default: ./fleet)")
    p.add_argument("--username", metavar="U", help="log in as U (instead of --auth)")
    p.add_argument("--password-file", type=Path, metavar="F", help="file holding U's password")
    p.add_argument("--tls-ca", type=Path, metavar="F", help="CA to verify an mqtts:// broker")
    p.add_argument("--tls-cert", type=Path, metavar="F", help="client certificate")
    p.add_argument("--tls-key", type=Path, metavar="F", help="client certificate's key")
    p.add_argument("--prefix", default="nmoe", help="topic prefix (default: nmoe)")
    p.add_argument("--fleet", default="default", help="fleet id (default: default)")
    p.add_argument("--wait", type=float, default=120.0, metavar="S",
                   help="how long to wait for the devices' presence, and for a round's quorum (default: 120)")
    p.add_argument("--task-timeout", type=float, default=900.0, metavar="S",
                   help="a device's time for one task when the config sets no round_timeout (default: 900)")
    p.add_argument("--device-threads", type=int, default=0, metavar="N",
                   help="torch threads on torch devices (default: as many as this machine's torch uses; "
                        "the simulation's numbers are reproduced only with the same count)")
    p.add_argument("--deploy", default=None, metavar="STAGE1/GATE",
                   help="the NMoE the devices serve afterwards, e.g. fedce/fedgate (default: the first Stage 1 "
                        "method with fedgate, else the first gate); 'none': keep serving what they serve")
    p.add_argument("--commit-precisions", default="fp32,int8", metavar="LIST",
                   help="model files each device rebuilds at the commit (default: fp32,int8)")
    p.add_argument("--stage1-from", type=Path, default=None, metavar="RUN_DIR",
                   help="take Stage 1 from a finished run dir (nmoe train or federate) whose config agrees on seed, "
                        "data, model, federated and stage1: the devices train Stages 2-3 only (numpy devices can)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_federate)

    d = subparsers.add_parser("fleet-data", help="write each device's training data file from a config",
                              description="Partition a config's dataset exactly as `nmoe train` does and write one "
                                          "torch-free .npz per device (docs/federated.md): OUT/device-<c>.npz.")
    d.add_argument("config", type=Path)
    d.add_argument("--out", required=True, type=Path, help="folder for the files")
    d.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    d.add_argument("--no-global-test", action="store_true", help="leave out the public test set (global accuracy)")
    d.set_defaults(func=_fleet_data)


def _fleet_data(args: argparse.Namespace) -> int:
    from toolkit.config import load
    from toolkit.fleet.device_data_files import write_fleet_data

    paths = write_fleet_data(load(args.config, args.set), args.out, with_global_test=not args.no_global_test)
    print(f"{len(paths)} device data files in {args.out}: {', '.join(p.name for p in paths)}")
    return 0


def _federate(args: argparse.Namespace) -> int:
    from broker.errors import BrokerError
    from device_agent.wire.mqtt_transport import (
        BrokerUrl,
        BrokerUrlError,
        MqttSettings,
        MqttTransport,
    )
    from toolkit.config import load
    from toolkit.fleet.federate import FederateError, FederateOptions, federate
    from toolkit.report import results_table

    cfg = load(args.config, args.set)
    try:
        url = BrokerUrl.parse(args.broker)
        username, password = _login(args)
        transport = MqttTransport(MqttSettings(url, username or f"{args.fleet}-coordinator", username, password,
                                               args.tls_ca, args.tls_cert, args.tls_key))
        precisions = tuple(p.strip() for p in args.commit_precisions.split(",") if p.strip())
        if not set(precisions) <= {"fp32", "int8"} or not precisions:
            raise ValueError(f"--commit-precisions {args.commit_precisions}: a list of fp32, int8")
        options = FederateOptions(args.prefix, args.fleet, args.wait, args.task_timeout,
                                  device_threads=args.device_threads,
                                  deploy="" if args.deploy == "none" else args.deploy,
                                  commit_precisions=precisions, show_progress=not args.quiet,
                                  stage1_from=args.stage1_from)
        metrics = federate(cfg, args.out, transport, options)
    except (BrokerUrlError, BrokerError, FederateError, ConnectionError, OSError, ValueError) as e:
        print(f"nmoe: error: {e}", file=sys.stderr)
        return 2
    print(results_table(metrics))
    committed = metrics["fleet"]["committed"]
    if committed:
        print(f"\nthe devices serve {committed['method']} as model version {committed['model_version']}")
    print(f"report: {args.out / 'report.md'}")
    return 0


def _login(args: argparse.Namespace) -> tuple[str | None, str | None]:
    """(user name, password) from --auth --fleet-dir or --username/--password-file; (None, None) without."""
    from broker.accounts import read_password
    from broker.layout import FleetLayout
    from device_agent.wire.training_link import COORDINATOR

    if args.username is not None:
        if args.password_file is None:
            raise ValueError("--username needs --password-file")
        return args.username, read_password(args.password_file)
    if args.auth:
        path = FleetLayout.of(args.fleet_dir).password(COORDINATOR)
        if not path.is_file():
            raise ValueError(f"{path} does not exist: --fleet-dir must be the fleet dir of `nmoe broker --auth`")
        return COORDINATOR, read_password(path)
    return None, None
