"""What `nmoe trial` checks before it starts anything."""

import json
import shutil
from pathlib import Path

import pytest

from toolkit.cli import main


def test_bundles_that_do_not_name_their_run_are_one_clear_error(onnx_tflite_bundles: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    bundles = tmp_path / "bundles"
    for src in sorted(onnx_tflite_bundles.glob("device-*")):
        dst = shutil.copytree(src, bundles / src.name)
        manifest = json.loads((dst / "manifest.json").read_text())
        del manifest["provenance"]["run_dir"]
        (dst / "manifest.json").write_text(json.dumps(manifest))
    assert main(["trial", "--bundles", str(bundles), "--out", str(tmp_path / "t"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [(f"nmoe: error: {bundles}: the manifests do not name the run they were exported from "
                   "(provenance.run_dir and provenance.method); the trial reads its test samples there")]
