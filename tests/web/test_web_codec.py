"""The web device's TypeScript: strict type checking, and the protocol's golden vectors decoded and
re-encoded byte for byte (every invalid vector rejected, 5000 mutations) in Node and in Chromium."""

import subprocess

from toolkit.fleet.web_devices import DEMO_DIR


def _run(*command: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, cwd=DEMO_DIR, capture_output=True, text=True, timeout=timeout, check=False)


def test_typescript_type_checks_strictly() -> None:
    for project in ("tsconfig.json", "tests/tsconfig.json"):
        result = _run("node_modules/.bin/tsc", "--noEmit", "-p", project)
        assert result.returncode == 0, result.stdout + result.stderr


def test_golden_vectors_in_node() -> None:
    built = _run("node", "scripts/build.mjs", "--tests")
    assert built.returncode == 0, built.stderr
    result = _run("node", "--test", "build/tests/")
    assert result.returncode == 0, result.stdout[-3000:]
    assert "# fail 0" in result.stdout and "# pass 1" in result.stdout  # 100+ checks


def test_golden_vectors_in_chromium() -> None:
    built = _run("node", "scripts/build.mjs", "--tests")
    assert built.returncode == 0, built.stderr
    result = _run("node", "scripts/browser-tests.mjs")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "HeadlessChrome" in result.stdout
    assert result.stdout.strip().endswith(" 0 failed")
