"""The import-linter contract of the wire layer lists every other module of device_agent."""

import pkgutil
import tomllib
from pathlib import Path

import device_agent

ROOT = Path(__file__).resolve().parent.parent


def test_the_wire_contract_forbids_every_module_outside_the_wire_layer() -> None:
    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    (wire,) = [c for c in contracts if c["source_modules"] == ["device_agent.wire"]]
    modules = {f"device_agent.{m.name}" for m in pkgutil.iter_modules(device_agent.__path__)} - {"device_agent.wire"}
    assert modules - set(wire["forbidden_modules"]) == set(), "add new device_agent modules to the wire contract"
