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


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `nmoe agent`."""
    p = subparsers.add_parser("agent", help="run a device agent: serve its expert, classify with the fleet",
                              description=HELP, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", required=True, type=Path, metavar="DIR", help="this device's bundle folder")
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
    p.set_defaults(func=_agent)


def _agent(args: argparse.Namespace) -> int:
    from device_agent.agent import Agent, AgentConfig
    from device_agent.bundle import BundleError, load_bundle
    from device_agent.device_models import DeviceModels
    from device_agent.runtime import UnsupportedFormat
    from device_agent.serving import ServerLimits
    from device_agent.wire.events import EventLog
    from device_agent.wire.mqtt_transport import (
        BrokerUrl,
        BrokerUrlError,
        MqttSettings,
        MqttTransport,
    )
    from device_agent.wire.protocol import ProtocolError

    try:
        url = BrokerUrl.parse(args.broker)
        if not url.tls and (args.tls_ca or args.tls_cert or args.tls_key):
            raise BrokerUrlError(f"--tls-ca/--tls-cert/--tls-key need an mqtts:// broker URL, got {args.broker}")
        password = None if args.password_file is None else _read_password(args.password_file)
        _check_tls_files(args.tls_ca, args.tls_cert, args.tls_key)
        bundle = load_bundle(args.bundle)
        models = DeviceModels.open(bundle, args.precision, args.runtime)
        config = AgentConfig(
            prefix=args.prefix, fleet=args.fleet, latent_encoding=args.latent_encoding,
            deadline_ms=args.deadline_ms,
            limits=ServerLimits(args.max_batch, args.queue, microbatch=not args.no_microbatch))
        settings = MqttSettings(url, f"{args.fleet}-{bundle.manifest.device_id}", args.username, password,
                                args.tls_ca, args.tls_cert, args.tls_key, args.mqtt_version)
        events = EventLog(args.events, echo=sys.stderr)
        agent = Agent(bundle, MqttTransport(settings), models, config, events)
    except (BundleError, UnsupportedFormat, BrokerUrlError, ProtocolError, OSError) as e:
        print(f"nmoe: error: {e}", file=sys.stderr)
        return 2
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    agent.start()
    print(f"nmoe agent: {agent.me} (expert {agent.expert_id}, model {agent.model_version[:12]}, "
          f"{models.expert.name}) on {args.broker}; Ctrl-C stops", file=sys.stderr, flush=True)
    stop.wait()
    agent.stop()
    events.close()
    return 0


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
