"""Extras that tell the truth (issue 15): on an `[agent]`-only install (a Raspberry Pi) every command
works or names the extra it needs in one line, the self-check checks what the device can run, and an
agent serves its expert over a real mosquitto.

The `[agent]` venv (`pip install -c constraints.txt ".[agent]"`, nothing else) is cached in
~/.cache/nmoe-edge/agent-venv-<hash of pyproject.toml + constraints.txt> and rebuilt when either
changes; commands run with PYTHONPATH set to this checkout, so they test its current code with only
the `[agent]` dependencies installed.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import re
import shutil
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from importlib.metadata import packages_distributions
from pathlib import Path

import numpy as np
import pytest

from device_agent.bundle import load_bundle
from device_agent.device_models import model_version
from device_agent.wire.clock import now_ms
from device_agent.wire.mqtt_transport import BrokerUrl, MqttSettings, MqttTransport
from device_agent.wire.protocol import (
    ExpertRequest,
    ExpertResponse,
    Topics,
    decode,
    encode,
    new_correlation_id,
)
from toolkit.cli import COMMAND_MODULES
from toolkit.extras import EXTRA_MODULES

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path.home() / ".cache" / "nmoe-edge"
SOURCES = ("pyproject.toml", "README.md", "toolkit", "export", "device_agent", "broker")
TIMEOUT_S = 120
STALE_S = 24 * 3600


# ---- the table of extras agrees with pyproject.toml ----------------------------------------------

def test_extra_modules_match_pyproject() -> None:
    """Each extra's modules come from its distributions, and each distribution has a module listed."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    modules_of: dict[str, set[str]] = {}
    for module, dists in packages_distributions().items():
        for dist in dists:
            modules_of.setdefault(_canonical(dist), set()).add(module)
    for extra, modules in EXTRA_MODULES.items():
        dists = [_canonical(re.split(r"[<>=!~\[ ]", requirement)[0]) for requirement in extras[extra]]
        provided = set().union(*(modules_of.get(d, set()) for d in dists))
        assert set(modules) <= provided, (extra, set(modules) - provided)
        assert all(modules_of.get(d, set()) & set(modules) for d in dists), (extra, dists)
    assert set().union(*map(set, COMMAND_MODULES.values())) <= set().union(*map(set, EXTRA_MODULES.values()))


def _canonical(dist: str) -> str:
    return re.sub(r"[-_.]+", "-", dist).lower()


# ---- an [agent]-only install ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def agent_venv() -> Path:
    """The cached `[agent]`-only venv (built on first use, ~20 s; rebuilt when the pins change)."""
    key = hashlib.sha256(b"".join((ROOT / f).read_bytes() for f in ("pyproject.toml", "constraints.txt")))
    venv = CACHE / f"agent-venv-{key.hexdigest()[:16]}"
    CACHE.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with (CACHE / "agent-venv.lock").open("w") as lock:  # other test runs may build it at the same time
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (venv / ".complete").exists():
            _build(venv)
        (venv / ".complete").touch()  # last used
        for stale in CACHE.glob("agent-venv-*/.complete"):  # other pins, unused for a day (other checkouts
            if time.time() - stale.stat().st_mtime > STALE_S:  # may still use theirs)
                shutil.rmtree(stale.parent, ignore_errors=True)
    print(f"\n[agent] venv {venv}: ready in {time.perf_counter() - start:.1f} s")
    return venv


def _build(venv: Path) -> None:
    """A fresh venv with `pip install -c constraints.txt ".[agent]"` of a copy of the sources."""
    shutil.rmtree(venv, ignore_errors=True)  # a build that was interrupted
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=TIMEOUT_S)
    source = venv / "source"
    source.mkdir()
    for name in SOURCES:  # a copy: building in the checkout would leave build/ and egg-info there
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(ROOT / name, source / name)
    pip = subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet", "--disable-pip-version-check",
                          "-c", str(ROOT / "constraints.txt"), f"{source}[agent]"],
                         check=False, capture_output=True, text=True, timeout=10 * TIMEOUT_S)
    shutil.rmtree(source)
    if pip.returncode != 0:
        pytest.fail(f"pip install .[agent] failed: {pip.stderr.strip()[-2000:]}")
    (venv / ".complete").write_text("")


def run(venv: Path, *argv: str, timeout: float = TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    """`argv` with the venv's programs first on PATH and this checkout's code."""
    return subprocess.run(argv, check=False, cwd=ROOT, env=_env(venv), capture_output=True, text=True,
                          timeout=timeout)


def _env(venv: Path) -> dict[str, str]:
    return {"PATH": f"{venv / 'bin'}:/usr/local/bin:/usr/sbin:/usr/bin:/bin", "HOME": str(Path.home()),
            "LANG": "C.UTF-8", "PYTHONPATH": str(ROOT)}


def one_line(result: subprocess.CompletedProcess[str], status: int, *parts: str) -> None:
    assert result.returncode == status, result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
    assert all(p in result.stderr for p in parts), result.stderr


@pytest.fixture(scope="module")
def onnx_only(onnx_tflite_bundles: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shared bundles without their LiteRT files: what a Pi with onnxruntime runs."""
    out = tmp_path_factory.mktemp("onnx-only")
    for src in sorted(onnx_tflite_bundles.glob("device-*")):
        dst = Path(shutil.copytree(src, out / src.name, ignore=shutil.ignore_patterns("*.tflite")))
        manifest = json.loads((dst / "manifest.json").read_text())
        manifest["models"] = [m for m in manifest["models"] if m["format"] == "onnx"]
        (dst / "manifest.json").write_text(json.dumps(manifest))
    return out


def test_the_agent_only_venv_has_no_torch_and_runs_the_device_commands(agent_venv: Path) -> None:
    assert "No module named 'torch'" in run(agent_venv, "python", "-c", "import torch").stderr
    assert "No module named 'matplotlib'" in run(agent_venv, "python", "-c", "import matplotlib").stderr
    top = run(agent_venv, "nmoe", "--help")
    assert top.returncode == 0 and all(c in top.stdout for c in ("agent", "broker", "train")), top.stderr
    for argv in (["nmoe", "agent", "--help"], ["nmoe", "broker", "--help"],
                 ["python", "-m", "device_agent.selfcheck", "--help"]):
        result = run(agent_venv, *argv)
        assert result.returncode == 0 and "usage:" in result.stdout and result.stderr == "", argv


def test_commands_needing_another_extra_say_which_in_one_line(agent_venv: Path, run_dir: Path,
                                                              onnx_tflite_bundles: Path, tmp_path: Path) -> None:
    expectations = [
        (["nmoe", "train", "configs/tiny.toml", "--out", str(tmp_path / "run")],
         "`nmoe train` needs the [train] extra", "no module torch, matplotlib, tqdm", "'.[train]'"),
        (["nmoe", "results", str(run_dir)], "`nmoe results` needs the [train] extra", "no module matplotlib"),
        (["nmoe", "export", str(run_dir), "--out", str(tmp_path / "bundles")],
         "`nmoe export` needs the [train] and [export] extras", "'.[train,export]'"),
        (["nmoe", "trial", "--bundles", str(onnx_tflite_bundles)], "`nmoe trial` needs the [train] extra"),
        (["python", "-m", "export.arm64_check", str(onnx_tflite_bundles)],
         "python -m export.arm64_check needs the [train] and [tflite] extras"),
        (["nmoe", "agent", "--bundle", str(onnx_tflite_bundles / "device-0"), "--runtime", "tflite"],
         "nmoe: error: format 'tflite' needs ai-edge-litert", "nmoe-edge[agent,tflite]"),
    ]
    for argv, *parts in expectations:
        one_line(run(agent_venv, *argv), 2, *parts)
    assert not (tmp_path / "run").exists()  # refused before anything was done


def test_the_selfcheck_checks_what_the_device_can_run(agent_venv: Path, onnx_only: Path,
                                                     onnx_tflite_bundles: Path) -> None:
    alone = run(agent_venv, "python", "-m", "device_agent.selfcheck", str(onnx_only / "device-0"))
    assert alone.returncode == 0 and "selfcheck: ok" in alone.stdout and "skipped" not in alone.stdout, alone
    assert alone.stdout.count(" onnx ") == 6  # 3 roles x fp32, int8
    mixed = run(agent_venv, "python", "-m", "device_agent.selfcheck", str(onnx_tflite_bundles / "device-0"),
                str(onnx_tflite_bundles / "device-1"))
    assert mixed.returncode == 0, mixed.stderr
    tflite_rows = re.findall(r"^device-\d +\w+ +tflite", mixed.stdout, re.MULTILINE)
    assert mixed.stdout.count(" onnx ") == 12 and tflite_rows == []
    assert ("skipped tflite models of device-0, device-1: format 'tflite' needs ai-edge-litert" in mixed.stdout
            and "(skipped formats not checked)" in mixed.stdout)
    as_json = json.loads(run(agent_venv, "python", "-m", "device_agent.selfcheck", "--json",
                             str(onnx_tflite_bundles / "device-0")).stdout)
    assert as_json["passed"] and [s["format"] for s in as_json["skipped"]] == ["tflite"]
    named = run(agent_venv, "python", "-m", "device_agent.selfcheck", "--formats", "tflite",
                str(onnx_tflite_bundles / "device-0"))
    one_line(named, 2, "selfcheck: error: format 'tflite' needs ai-edge-litert")


@pytest.fixture
def agent_only_fleet(agent_venv: Path, onnx_only: Path, tmp_path: Path) -> Iterator[str]:
    """`nmoe broker` and device-1's `nmoe agent`, both from the [agent] venv: the broker URL."""
    broker = subprocess.Popen(["nmoe", "broker", "--port", "0", "--fleet-dir", str(tmp_path / "fleet")], cwd=ROOT,
                              env=_env(agent_venv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    agent = None
    try:
        url = broker.stdout.readline().split()[2]
        agent = subprocess.Popen(["nmoe", "agent", "--bundle", str(onnx_only / "device-1"), "--broker", url],
                                 cwd=ROOT, env=_env(agent_venv), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                 text=True)
        yield url
    finally:
        for process in (agent, broker):
            if process is not None:
                process.terminate()
                process.communicate(timeout=30)


def test_an_agent_only_device_serves_its_expert_over_mosquitto(agent_only_fleet: str, onnx_only: Path) -> None:
    bundle = load_bundle(onnx_only / "device-1")
    samples = bundle.samples()
    topics, inbox = Topics(), Topics().reply("app")
    replies: list[object] = []
    online: list[bool] = []

    def on_message(topic: str, payload: bytes) -> None:
        if topic == topics.presence("device-1"):
            online.append(b'"online"' in payload)
        else:
            replies.append(decode(payload))

    client = MqttTransport(MqttSettings(BrokerUrl.parse(agent_only_fleet), "test-app"))
    client.subscribe(topics.presence("device-1"))
    client.subscribe(topics.reply_filter("app"))
    client.connect(None, on_message, lambda event, detail: None)
    try:
        end = time.monotonic() + 60
        while online[-1:] != [True] and time.monotonic() < end:
            time.sleep(0.05)
        assert online[-1:] == [True], "device-1 never announced itself"
        cid = new_correlation_id()
        client.publish(topics.expert_request(1), encode(ExpertRequest(
            cid, 1, now_ms() + 5000, model_version(bundle), inbox, samples["latent"])))
        end = time.monotonic() + 10
        while not replies and time.monotonic() < end:
            time.sleep(0.02)
    finally:
        client.close()
    reply, = replies
    assert isinstance(reply, ExpertResponse) and reply.correlation_id == cid
    assert np.allclose(reply.probs, samples["expert_probs"], atol=1e-5)  # what export measured with torch
