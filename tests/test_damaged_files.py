"""Every file the tools read, damaged: one `...: error:` line naming the file and what was expected,
exit 2, no traceback (issue 9, defect 3).

Run dir files (`nmoe results`, `nmoe export`, a resumed `nmoe train`), TOML configs, dataset files,
bundles (`nmoe agent`, `python -m device_agent.selfcheck`; model files that are corrupt although their
sha256 matches the manifest), password and TLS files (`nmoe agent`, `nmoe broker`).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from device_agent import selfcheck
from toolkit.cli import main

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "configs" / "tiny.toml"
TINY_RUN = ["--set", 'stage1.methods=["fedce"]', "--set", 'gate.methods=["fedgate","rangate"]',
            "--set", 'baselines.methods=["fedavg"]', "--set", "data.num_clients=3"]  # as tests/conftest.py
METHOD = "nmoe_fedce_fedgate"


def one_error_line(err: str, prefix: str, *parts: str) -> None:
    """`err` is exactly one line starting with `prefix` and holding every part."""
    assert err.count("\n") == 1 and err.startswith(prefix), err
    assert "Traceback" not in err and all(p in err for p in parts), err


def nmoe_process(*args: str) -> tuple[int, str]:
    """`nmoe ARGS` in its own process (an agent that starts would run until stopped): (status, stderr)."""
    try:
        done = subprocess.run([sys.executable, "-m", "toolkit.cli", *args], check=False, cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail(f"nmoe {' '.join(args)} did not stop within 120 s")
    # LiteRT's native logger announces each interpreter's XNNPACK delegate ("INFO: Created ...") on stderr
    native = "INFO: Created TensorFlow Lite XNNPACK delegate"
    return done.returncode, "".join(line for line in done.stderr.splitlines(keepends=True) if not line.startswith(native))


def truncate(path: Path) -> None:
    """Keep the first half of the file, as after a full disk or an interrupted copy."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


# ---- run dirs: nmoe results, nmoe export, nmoe train (resuming) ----------------------------------

@pytest.fixture
def run_copy(run_dir: Path, tmp_path: Path) -> Path:
    """A writable copy of the shared tiny run."""
    return Path(shutil.copytree(run_dir, tmp_path / "run"))


def set_json(path: Path, value: object) -> None:
    path.write_text(json.dumps(value))


RUN_DIR_DAMAGE: dict[str, tuple[list[str], Callable[[Path], None], str, str]] = {
    # id: (command after the run dir, damage, file named, what the message says)
    "results truncated metrics.json": (
        ["results"], lambda r: truncate(r / "metrics.json"), "metrics.json", "not valid JSON"),
    "results metrics.json without numbers": (
        ["results"], lambda r: set_json(r / "metrics.json", {"methods": {"fedavg": {"global_accuracy": 1}}}),
        "metrics.json", "expected an object whose 'methods' maps each method to its personalized_accuracy"),
    "results metrics.json not UTF-8": (
        ["results"], lambda r: (r / "metrics.json").write_bytes(b"\xff{}"), "metrics.json", "not valid JSON"),
    "export truncated metrics.json": (
        ["export"], lambda r: truncate(r / "metrics.json"), "metrics.json", "not valid JSON"),
    "export metrics.json a list": (
        ["export"], lambda r: set_json(r / "metrics.json", []), "metrics.json", "expected an object"),
    "export truncated config.json": (
        ["export", "--method", METHOD], lambda r: truncate(r / "config.json"), "config.json", "not valid JSON"),
    "export config.json with a bad key": (
        ["export", "--method", METHOD], lambda r: set_json(r / "config.json", {"data": {"alpha": "x"}}),
        "config.json", "data.alpha: expected a number"),
    "export truncated dataset.json": (
        ["export", "--method", METHOD], lambda r: truncate(r / "dataset.json"), "dataset.json", "not valid JSON"),
    "export dataset.json without input_shape": (
        ["export", "--method", METHOD], lambda r: set_json(r / "dataset.json", {"scale": 1}), "dataset.json",
        "expected an object with input_shape [C, H, W]"),
    "export truncated checkpoint": (
        ["export", "--method", METHOD], lambda r: truncate(r / "checkpoints" / "stage2_fedce.npz"),
        "stage2_fedce.npz", "damaged checkpoint (BadZipFile"),
    "export checkpoint of garbage": (
        ["export", "--method", METHOD], lambda r: (r / "checkpoints" / "stage1_fedce.npz").write_bytes(b"PK\x03\x04"),
        "stage1_fedce.npz", "damaged checkpoint"),
    "export checkpoint without the arrays": (
        ["export", "--method", METHOD],
        lambda r: np.savez(r / "checkpoints" / "stage3_fedce_fedgate.npz",
                           __meta__=np.frombuffer(b'{"step": 3, "done": true, "user": {}}', np.uint8)),
        "stage3_fedce_fedgate.npz", "no client0/ arrays"),
    "train resuming with a truncated config.json": (
        ["train"], lambda r: truncate(r / "config.json"), "config.json", "not valid JSON"),
    "train resuming with truncated checkpoints": (
        ["train"], lambda r: [truncate(p) for p in (r / "checkpoints").glob("*.npz")], ".npz",
        "delete it to recompute that job"),
}


@pytest.mark.parametrize("case", list(RUN_DIR_DAMAGE))
def test_a_damaged_run_dir_file_is_one_error_line(case: str, run_copy: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    command, damage, file, message = RUN_DIR_DAMAGE[case]
    damage(run_copy)
    if command == ["train"]:
        argv = ["train", str(TINY), "--out", str(run_copy), "--quiet", *TINY_RUN]
    elif command[0] == "export":
        argv = ["export", str(run_copy), "--out", str(tmp_path / "bundles"), "--quiet", *command[1:]]
    else:
        argv = [*command, str(run_copy)]
    assert main(argv) == 2
    one_error_line(capsys.readouterr().err, f"nmoe: error: {run_copy}", file, message)


# ---- TOML configs and dataset files --------------------------------------------------------------

@pytest.mark.parametrize("content, message", [
    (b"[data\n", "not valid TOML"),
    (b"\xff\xfe[data]", "not UTF-8 text; expected a TOML config file"),
    (None, "cannot read (Is a directory); expected a TOML config file"),
])
def test_a_damaged_config_is_one_error_line(content: bytes | None, message: str, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "config.toml"
    config.mkdir() if content is None else config.write_bytes(content)
    assert main(["train", str(config), "--out", str(tmp_path / "run")]) == 2
    one_error_line(capsys.readouterr().err, f"nmoe: error: {config}: ", message)


def test_a_truncated_dataset_file_is_one_error_line(run_dir: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "fmnist"
    data.mkdir()
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        (data / f"{name}.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x03" + bytes(100))[:40])
    assert main(["train", str(TINY), "--out", str(tmp_path / "run"), "--quiet", "--set",
                 "data.dataset=\"fashion_mnist\"", "--set", f"data.path=\"{data}\""]) == 2
    one_error_line(capsys.readouterr().err, "nmoe: error: ", str(data), "ubyte.gz")


# ---- bundles: nmoe agent and the self-check ------------------------------------------------------

def replace_in_bundle(bundle: Path, name: str, data: bytes) -> None:
    """Write `data` as the bundle's file `name` and make the manifest's size and sha256 match it."""
    (bundle / name).write_bytes(data)
    manifest = json.loads((bundle / "manifest.json").read_text())
    refs = [*manifest["models"], manifest["samples"]]
    next(ref for ref in refs if ref["file"] == name).update(sha256=hashlib.sha256(data).hexdigest(),
                                                             bytes=len(data))
    (bundle / "manifest.json").write_text(json.dumps(manifest))


@pytest.fixture
def bundle_copy(onnx_tflite_bundles: Path, tmp_path: Path) -> Path:
    """A writable copy of device-0's bundle (ONNX + LiteRT, fp32 + int8)."""
    return Path(shutil.copytree(onnx_tflite_bundles / "device-0", tmp_path / "device-0"))


BUNDLE_DAMAGE: dict[str, tuple[Callable[[Path], None], list[str], str, str]] = {
    # id: (damage, options of agent and self-check, file named, what the message says)
    "truncated manifest.json": (lambda b: truncate(b / "manifest.json"), [], "manifest.json", "not valid JSON"),
    "ONNX of garbage, sha256 matching": (
        lambda b: replace_in_bundle(b, "extractor.fp32.onnx", b"\x08\x07garbage" * 50), ["onnx"],
        "extractor.fp32.onnx", "the onnx runtime cannot load it (InvalidProtobuf"),
    "truncated ONNX, sha256 matching": (
        lambda b: replace_in_bundle(b, "gate.fp32.onnx", (b / "gate.fp32.onnx").read_bytes()[:300]), ["onnx"],
        "gate.fp32.onnx", "the onnx runtime cannot load it"),
    "LiteRT of garbage, sha256 matching": (
        lambda b: replace_in_bundle(b, "expert.fp32.tflite", b"garbage" * 50), ["tflite"],
        "expert.fp32.tflite", "the tflite runtime cannot load it (ValueError"),
    "a valid ONNX in the wrong place": (
        lambda b: replace_in_bundle(b, "expert.fp32.onnx", (b / "gate.fp32.onnx").read_bytes()), ["onnx"],
        "expert.fp32.onnx", "running it failed (InvalidArgument"),
}


def more_classes(bundle: Path) -> None:
    """A manifest promising 11 classes for models that give 10."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest.update(num_classes=11, class_names=[*manifest["class_names"], "extra"])
    (bundle / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("case", list(BUNDLE_DAMAGE))
def test_a_damaged_bundle_stops_the_agent_with_one_error_line(case: str, bundle_copy: Path) -> None:
    damage, runtime, file, message = BUNDLE_DAMAGE[case]
    damage(bundle_copy)
    runtime_options = ["--runtime", runtime[0]] if runtime else []
    status, err = nmoe_process("agent", "--bundle", str(bundle_copy), "--broker", "mqtt://127.0.0.1:1",
                               *runtime_options)
    assert status == 2, err
    one_error_line(err, f"nmoe: error: {bundle_copy}", file, message)


def test_an_agent_checks_each_model_against_its_manifest(bundle_copy: Path) -> None:
    more_classes(bundle_copy)
    status, err = nmoe_process("agent", "--bundle", str(bundle_copy), "--broker", "mqtt://127.0.0.1:1")
    assert status == 2, err
    one_error_line(err, f"nmoe: error: {bundle_copy / 'expert.fp32.onnx'}: ",
                   "output shape [1, 10] for one input, expected [1, 11] (from manifest.json)")


@pytest.mark.parametrize("case", [*BUNDLE_DAMAGE, "samples.npz"])
def test_a_damaged_bundle_fails_the_selfcheck_with_one_error_line(case: str, bundle_copy: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    if case == "samples.npz":  # truncated, with a matching sha256: np.load fails
        damage, file, message = (lambda b: replace_in_bundle(b, "samples.npz", (b / "samples.npz").read_bytes()[:200]),
                                 "samples.npz", "not a readable .npz")
    else:
        damage, _, file, message = BUNDLE_DAMAGE[case]
    damage(bundle_copy)
    assert selfcheck.main([str(bundle_copy)]) == 2
    one_error_line(capsys.readouterr().err, f"selfcheck: error: {bundle_copy}", file, message)


# ---- password and TLS files ----------------------------------------------------------------------

@pytest.mark.parametrize("option, content, message", [
    ("--password-file", b"\xff\xfe", "--password-file {f}: not UTF-8 text"),
    ("--password-file", b"\n", "--password-file {f}: empty"),
    ("--tls-ca", b"-----BEGIN CERTIFICATE-----\ngarbage\n", "--tls-ca {f}: not a readable PEM CA certificate"),
    ("--tls-cert", b"not a certificate", "--tls-cert {f}: not a readable PEM certificate"),
])
def test_a_damaged_credential_file_stops_the_agent_with_one_error_line(
        option: str, content: bytes, message: str, onnx_tflite_bundles: Path, tmp_path: Path) -> None:
    path = tmp_path / "file"
    path.write_bytes(content)
    scheme = "mqtts" if option.startswith("--tls") else "mqtt"
    status, err = nmoe_process("agent", "--bundle", str(onnx_tflite_bundles / "device-0"), "--broker",
                               f"{scheme}://127.0.0.1:1", option, str(path))
    assert status == 2, err
    one_error_line(err, "nmoe: error: ", message.format(f=path))


@pytest.mark.parametrize("damaged, message", [
    ("credentials/device-0.password", "not UTF-8 text; delete it to generate a new password"),
    ("tls/ca.crt", "mosquitto exited with status"),
    ("tls/ca.key", "openssl"),
])
def test_a_damaged_broker_file_is_one_error_line(damaged: str, message: str, tmp_path: Path) -> None:
    fleet = tmp_path / "fleet"
    command = [sys.executable, "-m", "toolkit.cli", "broker", "--auth", "--tls", "--devices", "1", "--port", "0",
               "--fleet-dir", str(fleet)]
    first = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert first.stdout.readline().startswith("nmoe broker: mqtts://")  # the files exist now
    first.terminate()
    first.communicate(timeout=10)
    (fleet / damaged).write_bytes(b"\xff\xfe damaged")
    if damaged == "tls/ca.key":  # a leaf to reissue with the damaged CA key
        (fleet / "credentials" / "device-0.crt").unlink()
    again = subprocess.run(command, check=False, cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert again.returncode == 2, again.stderr
    one_error_line(again.stderr, "nmoe: error: ", message)
    if damaged.startswith("credentials"):
        assert str(fleet / damaged) in again.stderr
