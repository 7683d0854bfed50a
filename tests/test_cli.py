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
    saved = json.loads(out.read_text())
    assert len(saved["results"]) == 2 and saved["torch"] == __import__("torch").__version__


def test_python_m_entry_point():
    r = subprocess.run([sys.executable, "-m", "lowbit_adamw", "train", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--steps" in r.stdout


def test_gpu_kernel_check_script_smoke_runs_under_interpreter(tmp_path):
    import os
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_kernel_check.py"
    out = tmp_path / "r.json"
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, str(script), "--smoke", "--sweep", "--out", str(out)], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert res["max_code_diff_vs_torch"] == 0 and res["max_param_diff_vs_torch"] == 0  # one spec, to the bit
    assert len(res["sweep"]) == 18 and sum(s["chosen"] for s in res["sweep"]) == 1


def test_gpu_offload_check_script_smoke_runs_on_the_cpu_stand_in(tmp_path):
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_offload_check.py"
    out = tmp_path / "r.json"
    r = subprocess.run([sys.executable, str(script), "--smoke", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    for name in ("offload", "offload_in_backward"):  # the offloaded runs equal their on-device loops to the bit
        assert res["configs"][name]["max_diff_quantized_state"] == 0 and res["configs"][name]["max_diff_fp32_state"] == 0
    assert res["configs"]["offload"]["host_pinned_bytes"] > 0 and res["configs"]["device"]["host_pinned_bytes"] == 0


def test_the_main_job_compares_over_seeds_and_shows_the_spread(capsys):
    from lowbit_adamw.cli import _print_table, held_out_gaps

    tiny = dict(steps=3, dim=32, layers=1, seq_len=32, batch_size=4, progress=False)
    rows = train_compare(seed=5, seeds=2, **tiny)
    base, ours = rows
    assert base["seeds"] == ours["seeds"] == [5, 6] and len(ours["held_out_losses"]) == 2
    assert ours["held_out_loss"] == sum(ours["held_out_losses"]) / 2
    # each seed's run is the run that seed gives alone (same init, same batches)
    alone = train_compare(seed=6, seeds=1, **tiny)
    assert [r["held_out_losses"] for r in alone] == [[r["held_out_losses"][1]] for r in rows]
    gaps = held_out_gaps(base, ours)
    _print_table(rows)
    out = capsys.readouterr().out
    assert f"(mean of 2 seeds; per seed {gaps[0]:+.2f}%, {gaps[1]:+.2f}%)" in out


def test_the_verdict_weighs_the_mean_against_the_seed_noise():
    from lowbit_adamw.cli import verdict

    inside = verdict([0.2, 0.59, -0.56], "adamw")  # mean 0.077, s.e. 0.337, t(2) 4.303
    assert "no difference beyond seed-to-seed noise (95% interval of the mean: +-1.45%); within 1.5% of adamw's" in inside
    assert "0.08" not in inside and "higher" not in inside and "lower" not in inside  # no sign for a mean inside the noise
    assert "higher than adamw's beyond" in verdict([2.0, 2.2, 1.9], "adamw")
    assert "lower than adamw's beyond" in verdict([-2.0, -2.2, -1.9], "adamw")
    assert "one seed says nothing" in verdict([0.3], "adamw")
    # three seeds that happen to agree are not yet beyond the noise (two standard errors would say they are)
    assert "no difference beyond" in verdict([-0.51, -0.46, -0.02], "adamw")
    assert "lower than adamw's beyond" in verdict([-0.51, -0.46, -0.02, -0.4, -0.3, -0.35, -0.45, -0.2, -0.5, -0.3, -0.4, -0.3], "adamw")


def test_the_schedule_warms_up_then_decays_to_a_tenth():
    from lowbit_adamw.cli import lr_factor

    assert [lr_factor(i, 100, 4) for i in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert abs(lr_factor(52, 100, 4) - 0.55) < 1e-12 and abs(lr_factor(100, 100, 4) - 0.1) < 1e-12
    assert lr_factor(0, 100, 0) == 1.0


def test_the_main_job_clips_gradients_when_asked():
    tiny = dict(optimizers=("adamw",), steps=3, dim=32, layers=1, seq_len=32, batch_size=4, lr=1e-2, warmup=1,
                progress=False)
    free = train_compare(max_grad_norm=None, **tiny)[0]["held_out_loss"]
    clipped = train_compare(max_grad_norm=1e-12, **tiny)[0]["held_out_loss"]
    untrained = train_compare(**{**tiny, "lr": 0.0})[0]["held_out_loss"]
    # AdamW normalizes the gradient's size away, except where clipping makes it vanish under eps
    assert abs(clipped - untrained) < 0.02 < untrained - free
