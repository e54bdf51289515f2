"""`splitfed plot`: loss per silo from a demo JSON, the centralized reference dashed."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import matplotlib  # noqa: F401  (a declared test dependency: fail loudly if missing)
import pytest
from click.testing import CliRunner

from splitfed.plot_command import RunFileError, curves, plot


def _run_doc(silos: int = 2, steps: int = 6, reference: bool = True) -> dict:
    schedule = [[f"silo{i}", s] for s in range(steps) for i in range(silos)]
    losses = [5.6 - 0.3 * s - 0.01 * i for s in range(steps) for i in range(silos)]
    doc = {"mode": "serial", "silos": silos, "steps": steps, "model": "tiny", "adapter": "lora", "run_id": "demo-1",
           "losses": losses, "schedule": schedule}
    if reference:
        doc["centralized_losses"] = list(losses)
        doc["max_abs_loss_diff"] = 0.0
    return doc


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", data[16:24])


def test_curves_per_silo_in_step_order():
    run, ref = curves(_run_doc(silos=2, steps=3))
    assert sorted(run) == ["silo0", "silo1"]
    assert [s for s, _ in run["silo1"]] == [0, 1, 2]
    assert run["silo0"][1] == (1, pytest.approx(5.3)) and ref == run


def test_plot_writes_a_png(tmp_path):
    src = tmp_path / "run.json"
    src.write_text(json.dumps(_run_doc(silos=3, steps=10)))
    out = tmp_path / "plots" / "loss.png"
    result = CliRunner().invoke(plot, [str(src), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert f"wrote {out}" in result.output
    width, height = _png_size(out)
    assert (width, height) == (960, 576)  # 8 x 4.8 inches at 120 dpi
    assert out.stat().st_size > 10_000  # lines, labels and legend, not a blank canvas


def test_plot_without_reference_and_default_output(tmp_path):
    src = tmp_path / "run.json"
    src.write_text(json.dumps(_run_doc(reference=False)))
    result = CliRunner().invoke(plot, [str(src)])
    assert result.exit_code == 0, result.output
    assert _png_size(tmp_path / "run.png")[0] > 0


def test_plot_of_a_silo_results_file(tmp_path):
    src = tmp_path / "silo0.json"
    src.write_text(json.dumps({"silo_id": "silo0", "steps": [{"round": 0, "step": s, "loss": 5 - s / 10} for s in range(5)]}))
    result = CliRunner().invoke(plot, [str(src), "--out", str(tmp_path / "s.svg")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "s.svg").read_text().lstrip().startswith("<?xml")


@pytest.mark.parametrize("doc, message", [
    ({"losses": [1.0]}, "expected 'losses' and 'schedule'"),
    ({"losses": [1.0, 2.0], "schedule": [["silo0", 0]]}, "2 entries but 'schedule' has 1"),
    ({"losses": [1.0], "schedule": [["silo0", 0]], "centralized_losses": [1.0, 2.0]}, "as long as 'losses'"),
    ({"losses": ["x"], "schedule": [["silo0", 0]]}, "bad schedule/loss entry 0"),
])
def test_bad_run_files_get_clear_errors(tmp_path, doc, message):
    with pytest.raises(RunFileError, match=message):
        curves(doc)
    src = tmp_path / "bad.json"
    src.write_text(json.dumps(doc))
    result = CliRunner().invoke(plot, [str(src), "--out", str(tmp_path / "x.png")])
    assert result.exit_code == 1 and message.split("'")[0] in result.output
    assert not (tmp_path / "x.png").exists()


def test_not_json(tmp_path):
    src = tmp_path / "bad.json"
    src.write_text("{not json")
    result = CliRunner().invoke(plot, [str(src)])
    assert result.exit_code == 1 and "not a readable JSON file" in result.output


def test_missing_matplotlib_is_a_clear_error(tmp_path):
    """Run in a fresh interpreter where importing matplotlib fails."""
    src = tmp_path / "run.json"
    src.write_text(json.dumps(_run_doc()))
    code = ("import sys; sys.modules['matplotlib'] = None\n"
            "from splitfed.cli import main\n"
            f"main(['plot', {str(src)!r}, '--out', {str(tmp_path / 'x.png')!r}])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "splitfed plot needs matplotlib: pip install 'splitfed[plot]'" in proc.stderr
