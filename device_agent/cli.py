"""`nmoe agent`: run one device of the fleet until SIGINT/SIGTERM.

Imports nothing heavy at load (toolkit.cli loads it as a plugin); the agent, paho-mqtt and the
runtime are imported by the command itself. Never imports torch (for ONNX and LiteRT bundles).
"""

from __future__ import annotations

import argparse
import signal
import ssl
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from device_agent.agent import Agent
    from device_agent.device_data import DeviceData
    from device_agent.training_service import TrainingService
    from device_agent.wire.events import EventLog

HELP = """\
Run the device agent of one bundle: it serves the device's expert to the fleet and classifies
with the fleet, over an MQTT broker (docs/protocol.md).

On connect it publishes its presence (retained; the broker publishes "offline" as its last will
if the device vanishes) and subscribes to:
  {prefix}/{fleet}/expert/{its expert}/req   latents from peers -> its expert's probabilities,
                                             micro-batched: queued requests share one model call
  {prefix}/{fleet}/infer/{device}/req        raw images from apps -> the combined NMoE output
  {prefix}/{fleet}/reply/{device}/+          answers to its own requests
  {prefix}/{fleet}/presence/+                who is online, with which model version
  {prefix}/{fleet}/drain/{device}            the operator's drain command: stop serving for a while
It publishes telemetry (its counters, latency, errors, CPU, memory, bytes; docs/protocol.md §15)
on {prefix}/{fleet}/telemetry/{device} every --telemetry-period seconds.

To classify, it runs extractor and gate locally, asks the devices holding the other top-k
experts (re-routing to the next-best live expert before sending when one is offline or runs
another model version), runs its own expert meanwhile, and combines the answers that came back
before --deadline-ms (weights renormalized over them). Its own expert always answers, so an
inference never fails because a peer is gone. Lost broker connections are retried with capped
exponential backoff.

The bundle is verified first (schema, sha256 of every file), then each model is loaded and run
once on a zero input (its output shape must match the manifest); a bad bundle, model, runtime,
URL, password or TLS file exits with status 2 and one error line. SIGINT/SIGTERM publishes the
offline presence, disconnects and exits 0.
"""

EPILOG = """\
examples:
  nmoe agent --bundle bundles/quick/device-0 --broker mqtt://127.0.0.1:1883
  nmoe agent --bundle bundles/pi/device-3 --broker mqtts://broker.lan:8883 --tls-ca ca.pem \\
             --username device-3 --password-file /etc/nmoe/password
  nmoe agent --bundle B --broker mqtt://10.0.0.2:1883 --runtime tflite --precision int8 \\
             --latent-encoding int8 --deadline-ms 500 --events agent.jsonl
  nmoe agent --bundle B --broker mqtt://127.0.0.1:1883 --no-microbatch --queue 8   # benchmark baseline

event log (--events): one JSON object per line: connect/reconnect/disconnect, presence changes,
each inference (experts chosen/answered/re-routed, latency per path, bytes on the wire, and for
inference requests from the wire their correlation ids in hex with the experts combined for each),
errors, and the counters at exit.
"""


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (shared by the `nmoe` subcommands)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `nmoe agent`."""
    p = subparsers.add_parser("agent", help="run a device agent: serve its expert, classify with the fleet",
                              description=HELP, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, metavar="DIR",
                   help="this device's bundle folder (optional with --data: the agent then waits for federated "
                        "training to build its models)")
    p.add_argument("--broker", default="mqtt://127.0.0.1:1883", metavar="URL",
                   help="mqtt://HOST[:PORT] or mqtts://HOST[:PORT] for TLS (default: mqtt://127.0.0.1:1883)")
    p.add_argument("--username", metavar="U", help="broker user name")
    p.add_argument("--password-file", type=Path, metavar="F", help="file holding the broker password")
    p.add_argument("--tls-ca", type=Path, metavar="F", help="CA certificate(s) to verify the broker "
                   "(mqtts:// only; default: the system's)")
    p.add_argument("--tls-cert", type=Path, metavar="F", help="client certificate (mqtts:// only)")
    p.add_argument("--tls-key", type=Path, metavar="F", help="client certificate's private key")
    p.add_argument("--runtime", choices=("onnx", "tflite", "executorch"), default="onnx",
                   help="model format to run (default: onnx)")
    p.add_argument("--precision", choices=("fp32", "int8"), default="fp32", help="models to run (default: fp32)")
    p.add_argument("--latent-encoding", choices=("fp32", "fp16", "int8"), default="fp32",
                   help="how latents travel to peers that accept it (default: fp32, exact)")
    p.add_argument("--deadline-ms", type=positive_int, default=1000, metavar="MS",
                   help="how long an inference waits for peer experts (default: 1000)")
    p.add_argument("--max-batch", type=positive_int, default=32, metavar="N",
                   help="largest batch per request and per model call (default: 32)")
    p.add_argument("--queue", type=positive_int, default=64, metavar="N",
                   help="requests waiting to be served; beyond it peers get BUSY (default: 64)")
    p.add_argument("--no-microbatch", action="store_true",
                   help="one model call per request instead of batching queued requests")
    p.add_argument("--prefix", default="nmoe", metavar="P", help="topic prefix (default: nmoe)")
    p.add_argument("--fleet", default="default", metavar="F", help="fleet id (default: default)")
    p.add_argument("--mqtt-version", choices=("3.1.1", "5"), default="3.1.1", help="(default: 3.1.1)")
    p.add_argument("--events", type=Path, metavar="FILE", help="append JSON-lines events to FILE")
    p.add_argument("--keepalive", type=positive_int, default=30, metavar="S",
                   help="MQTT keep-alive; the broker publishes the offline will after 1.5 x S of silence (default: 30)")
    p.add_argument("--telemetry-period", type=positive_float, default=10.0, metavar="S",
                   help="publish telemetry on {prefix}/{fleet}/telemetry/{device} every S seconds (default: 10)")
    p.add_argument("--eval-samples", type=Path, metavar="FILE",
                   help="an .npz of this device's own labelled inputs (uint8 `images`, `labels`; a bundle's "
                        "samples.npz is one): classify them with the fleet and report the accuracy in telemetry")
    p.add_argument("--eval-rate", type=positive_float, default=5.0, metavar="R",
                   help="--eval-samples inputs per second (default: 5)")
    t = p.add_argument_group("federated training (nmoe federate; docs/federated.md)")
    t.add_argument("--data", type=Path, metavar="FILE",
                   help="this device's training data (.npz, docs/federated.md): take part in federated training")
    t.add_argument("--state", type=Path, metavar="DIR",
                   help="where the device keeps its private models and training state (default: ./state-DEVICE)")
    t.add_argument("--trainer", choices=("auto", "torch", "numpy"), default="auto",
                   help="torch: the simulation's exact updates, all stages (needs the [train] extra); numpy: "
                        "torch-free, Stages 2-3 only; auto: torch if installed (default: auto)")
    t.add_argument("--device", metavar="ID", help="without --bundle: this device's id (default: device-CLIENT)")
    p.set_defaults(func=_agent)


def _agent(args: argparse.Namespace) -> int:
    from device_agent.agent import Agent, AgentConfig
    from device_agent.bundle import BundleError, load_bundle
    from device_agent.device_data import DeviceDataError, load_device_data
    from device_agent.device_models import DeviceModels
    from device_agent.runtime import UnsupportedFormat
    from device_agent.serving import ServerLimits
    from device_agent.telemetry import DeviceTelemetry, EvalSamples, TelemetryEvents
    from device_agent.wire.mqtt_transport import (
        BrokerUrl,
        BrokerUrlError,
        MqttSettings,
        MqttTransport,
    )
    from device_agent.wire.protocol import ProtocolError
    from device_agent.wire.tap import TappedTransport

    if args.bundle is None and args.data is None:
        print("nmoe: error: nmoe agent needs --bundle DIR, or --data FILE to join federated training", file=sys.stderr)
        return 2
    try:
        url = BrokerUrl.parse(args.broker)
        if not url.tls and (args.tls_ca or args.tls_cert or args.tls_key):
            raise BrokerUrlError(f"--tls-ca/--tls-cert/--tls-key need an mqtts:// broker URL, got {args.broker}")
        password = None if args.password_file is None else _read_password(args.password_file)
        _check_tls_files(args.tls_ca, args.tls_cert, args.tls_key)
        data = None if args.data is None else load_device_data(args.data)
        bundle = None if args.bundle is None else load_bundle(args.bundle)
        models = None if bundle is None else DeviceModels.open(bundle, args.precision, args.runtime)
        device = bundle.manifest.device_id if bundle else (args.device or f"device-{data.client}")  # type: ignore[union-attr]
        expert = bundle.manifest.expert_id if bundle else data.client  # type: ignore[union-attr]
        if bundle is not None and data is not None and data.client != expert:
            raise DeviceDataError(f"--data {args.data} holds client {data.client}'s data; the bundle's expert is {expert}")
        config = AgentConfig(
            prefix=args.prefix, fleet=args.fleet, latent_encoding=args.latent_encoding,
            deadline_ms=args.deadline_ms,
            limits=ServerLimits(args.max_batch, args.queue, microbatch=not args.no_microbatch))
        settings = MqttSettings(url, f"{args.fleet}-{device}", args.username, password,
                                args.tls_ca, args.tls_cert, args.tls_key, args.mqtt_version, args.keepalive)
        if args.eval_samples is not None and bundle is None:
            raise OSError("--eval-samples needs --bundle (it classifies with the bundle's models)")
        samples = None if args.eval_samples is None or bundle is None else EvalSamples.load(
            args.eval_samples, tuple(bundle.manifest.input.shape), bundle.manifest.num_classes)
        events = TelemetryEvents(args.events, echo=sys.stderr)
        tap = TappedTransport(MqttTransport(settings))
        agent = Agent(bundle, tap, models, config, events, device=device, expert=expert)
        telemetry = DeviceTelemetry(agent, tap, events, args.telemetry_period, samples, args.eval_rate)
        service = None if data is None else _training_service(agent, data, args, events)
    except (BundleError, UnsupportedFormat, BrokerUrlError, ProtocolError, OSError, DeviceDataError) as e:
        print(f"nmoe: error: {e}", file=sys.stderr)
        return 2
    if service is not None:
        service.attach()
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    telemetry.start()
    agent.start()
    serving = f"model {agent.model_version[:12]}, {models.expert.name}" if models else "untrained"
    training = f"; trains with {service.options.backend}, state in {service.state_dir}" if service else ""
    print(f"nmoe agent: {agent.me} (expert {agent.expert_id}, {serving}) on {args.broker}{training}; Ctrl-C stops",
          file=sys.stderr, flush=True)
    # Wake up regularly: a signal the kernel delivers to another thread runs its Python handler only when the
    # main thread runs, and an Event.wait() without a timeout may never return (SIGTERM after SIGCONT hung)
    while not stop.wait(0.5):
        pass
    if service is not None:
        service.stop()
    telemetry.stop()
    agent.stop()
    events.close()
    return 0


def _training_service(agent: Agent, data: DeviceData, args: argparse.Namespace, events: EventLog) -> TrainingService:
    """The agent's part in federated training (imported only with --data: the trainer needs threadpoolctl);
    OSError when the chosen trainer is not installed here."""
    from device_agent.training.device_ops import OperationRefused, trainer_backend
    from device_agent.training_service import ServiceOptions, TrainingService

    try:
        backend = trainer_backend(args.trainer)
    except OperationRefused as e:
        raise OSError(f"--trainer {args.trainer}: {e}") from None
    return TrainingService(agent, data, args.state or Path(f"state-{agent.me}"), ServiceOptions(backend), events)


def _read_password(path: Path) -> str:
    """The password in `path` (one line), or an OSError naming the option."""
    try:
        password = path.read_bytes().decode("utf-8").rstrip("\r\n")
    except OSError as e:
        raise OSError(f"--password-file {path}: cannot read it ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise OSError(f"--password-file {path}: not UTF-8 text; expected the password on one line") from None
    if not password:
        raise OSError(f"--password-file {path}: empty; expected the password on one line")
    return password


def _check_tls_files(ca: Path | None, cert: Path | None, key: Path | None) -> None:
    """Load the TLS files as the connection will, so a bad one is an OSError naming its option."""
    if ca is not None:
        try:
            ssl.create_default_context(cafile=ca)
        except OSError as e:
            raise OSError(f"--tls-ca {ca}: not a readable PEM CA certificate ({e.strerror or e})") from None
    if key is not None and cert is None:
        raise OSError("--tls-key needs --tls-cert (the client certificate of that key)")
    if cert is not None:
        try:
            ssl.create_default_context().load_cert_chain(cert, key)
        except OSError as e:
            files = f"--tls-cert {cert}" + (f" / --tls-key {key}" if key else "")
            raise OSError(f"{files}: not a readable PEM certificate and matching private key "
                          f"({e.strerror or e})") from None
