import json
import subprocess
import sys

from lowbit_adamw.cli import main, train_compare


def test_train_compare_runs_both_and_saves_memory():
    rows = train_compare(steps=4, dim=32, layers=1, seq_len=32, batch_size=4, progress=False)
    by = {r["optimizer"]: r for r in rows}
    assert set(by) == {"adamw", "adamw8bit"}
    assert 8.0 <= by["adamw"]["state_bytes_per_param"] < 8.01  # + 4-byte step counters
    assert by["adamw8bit"]["state_bytes_per_param"] < 0.4 * by["adamw"]["state_bytes_per_param"]
    assert abs(by["adamw8bit"]["train_loss"] - by["adamw"]["train_loss"]) < 0.05


def test_cli_default_subcommand_and_json(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["--steps", "2", "--dim", "32", "--layers", "1", "--seq-len", "32", "--no-progress", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "adamw8bit" in text and "less optimizer state" in text
    assert len(json.loads(out.read_text())) == 2


def test_python_m_entry_point():
    r = subprocess.run([sys.executable, "-m", "lowbit_adamw", "train", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--steps" in r.stdout
