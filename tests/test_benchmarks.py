"""The benchmark scripts run (tiny settings) and write what they claim; the stress case is also a
quality check of ours: sparse, embedding-like gradients must not blow up."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")
sys.path.insert(0, BENCH)


def script(name, *args):
    out = subprocess.run([sys.executable, os.path.join(BENCH, name), *args], capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return out.stdout


def test_stress_sparse_gradients_do_not_blow_up():
    import stress_sparse

    w, start, r = stress_sparse.run("lowbit_8bit", rows=1024, dim=256, steps=120, lr=1e-3)
    ref, _, _ = stress_sparse.run("adamw", rows=1024, dim=256, steps=120, lr=1e-3)
    assert r["finite"]
    assert r["max_update_over_lr"] < 20  # fp32 AdamW: about 2; a blow-up is thousands (torchao, see README)
    assert ((w - ref).norm() / (ref - start).norm()).item() < 0.1


def test_stress_sparse_4bit_stays_within_10x_lr():
    import stress_sparse

    _, _, r = stress_sparse.run("lowbit_4bit", rows=1024, dim=256, steps=120, lr=1e-3)
    assert r["finite"] and r["max_update_over_lr"] < 10  # the bound; fp32 AdamW: about 3


def test_convergence_run_records_curves():
    import convergence

    r = convergence.run("lowbit_8bit", 3e-3, steps=6, dim=32, layers=1, seq_len=32, batch=4, eval_every=3)
    assert r["finite"] and len(r["train_curve"]) == 6 and [s for s, _ in r["held_out"]] == [3, 6]


@pytest.fixture(scope="module")
def step_speed_run(tmp_path_factory):
    """One run of step_speed.py for both tests (each run costs ~15 s of processes and compiles)."""
    pytest.importorskip("bitsandbytes")
    tmp = tmp_path_factory.mktemp("step_speed")
    out = script("step_speed.py", "--set", "small", "--count", "5", "--numel", "5000", "--rounds", "1",
                 "--only", "fused,lowbit AdamW8bit,bnb AdamW8bit", "--out", str(tmp / "s.json"), "--png", str(tmp / "s.png"))
    return json.load(open(tmp / "s.json")), out, tmp / "s.png"


def test_step_speed_writes_json_and_png(step_speed_run):
    data, out, png = step_speed_run
    assert set(data["median_ms"]) == {"torch AdamW fused", "lowbit AdamW8bit", "lowbit AdamW8bit eager",
                                      "lowbit AdamW8bit torch.compile", "bnb AdamW8bit"}
    assert data["cpu_isa"] and data["cpu_model"]  # the requirement: every result names the ISA
    assert data["tensors"] == 5 and data["ratio_to_torch_fused"]["torch AdamW fused"] == 1.0
    assert "device" in data and "versions" in data and "date" in data and "command" in data
    assert png.stat().st_size > 1000
    assert "x fused" in out


def test_step_speed_times_each_peer_in_its_own_process(step_speed_run):
    data = step_speed_run[0]
    own = data["peers_in_own_process"]["bnb AdamW8bit"]  # beside a torch fused of its own, not this process's
    assert own["torch_fused_ms"] > 0 and data["ratio_to_torch_fused"]["bnb AdamW8bit"] == own["ratio_to_torch_fused"]
    assert own["ratio_to_torch_fused"] == pytest.approx(own["median_ms"] / own["torch_fused_ms"])
    assert set(data["peers_in_own_process"]) == {"bnb AdamW8bit"}  # ours and torch's are timed in this process
    assert data["versions"]["bitsandbytes"]  # read from the installed distribution, without importing it


def test_codec_quality_reports_ratio_to_bnb(tmp_path):
    pytest.importorskip("bitsandbytes")
    script("codec_quality.py", "--steps", "3", "--out", str(tmp_path / "c.json"))
    data = json.load(open(tmp_path / "c.json"))
    err = data["update_error"]
    bnb = err["8-bit bnb dynamic maps"]
    assert data["update_error_vs_bnb"]["8-bit lowbit (m sqrt, v 4th root)"] == err["8-bit lowbit (m sqrt, v 4th root)"] / bnb
    assert any(k.startswith("4-bit lowbit (m dynamic exponent") for k in err) and any("format v2" in k for k in err)


def test_first_step_times_cold_and_cached_builds(tmp_path):
    script("first_step.py", "--runs", "torch-fused:8,cpp:8", "--out", str(tmp_path / "f.json"))
    rows = json.load(open(tmp_path / "f.json"))["results"]
    assert [(r["backend"], r["bits"]) for r in rows] == [("torch-fused", 8), ("cpp", 8)]
    assert all(r[k] > 0 for r in rows for k in ("cold_first_step_s", "warm_first_step_s", "later_step_s"))


def test_codec_drift_tracks_decoded_state_against_fp32_moments(monkeypatch):
    import codec_drift

    monkeypatch.setattr(codec_drift, "REPORT_AT", (20, 40))  # what main() sets from --steps
    r = codec_drift.run_stream("noise", 40, ["lowbit_8bit", "lowbit_4bit"], quick=True)
    assert r["stream"] == "noise" and r["steps"] == 40 and r["max_update_fp32"] > 0
    for name, res in r["results"].items():
        last = res["rows"][-1]
        assert last["step"] == 40 and last["max_update_fp32"] == r["max_update_fp32"]
        assert abs(last["v_bias"]) < 0.05, name  # the dithered v does not creep (format v4)
        assert 0 < last["update_error"] < (0.05 if name == "lowbit_8bit" else 0.6), name


def test_float_codes_are_exact_on_their_levels_and_unbiased_with_the_dither():
    import torch

    from codec_candidates import _float_code, _float_level

    levels = _float_level(torch.arange(241), 4, 4)  # E4M4: 2^-15 .. 1, 16 levels a binade
    assert levels[-1] == 1.0 and levels[0] == 2.0**-15 and bool((levels[1:] > levels[:-1]).all())
    assert torch.equal(_float_code(levels, 4, 4, None), torch.arange(241))
    s = torch.full((200_000,), 0.3)  # between two levels: the dithered code decodes to s on average
    u = torch.rand(s.shape, generator=torch.Generator().manual_seed(0))
    mean = _float_level(_float_code(s, 4, 4, u), 4, 4).double().mean().item()
    assert abs(mean / 0.3 - 1) < 2e-3 and len(set(_float_code(s, 4, 4, u).tolist())) == 2


def test_cpu_step_parts_edits_apply_in_order_and_each_build_compiles(tmp_path, monkeypatch):
    from pathlib import Path

    import cpu_step_parts

    from lowbit_adamw.step import cpu_kernel

    runs = cpu_step_parts.builds(open(cpu_step_parts.CPP_SOURCE).read(), str(tmp_path))
    texts = [open(path).read() for _, path in runs]
    assert len(runs) == len(cpu_step_parts.LADDER) + 1 and all(a != b for a, b in zip(texts, texts[1:]))
    cxx = cpu_kernel._compiler()
    if cxx:  # a syntax check (a tenth of a second) instead of seven builds
        for name, path in runs:
            r = subprocess.run([cxx, "-fsyntax-only", path], capture_output=True, text=True)
            assert r.returncode == 0, (name, r.stderr[-2000:])
    # each timed process builds from the source it is given: another source is another library
    shipped = cpu_kernel.library_path()[0]
    monkeypatch.setattr(cpu_kernel, "_SOURCE", Path(runs[-1][1]))
    assert cpu_kernel.library_path()[0] != shipped
    with pytest.raises(ValueError, match="no longer contains"):
        cpu_step_parts.builds("", str(tmp_path))


def test_codec_candidates_simulate_format_v4_beside_a_root_free_v_code(monkeypatch):
    import codec_drift

    monkeypatch.setattr(codec_drift, "REPORT_AT", (100,))
    r = codec_drift.run_stream("noise", 100, ["lowbit_8bit", "cand:v4sim", "cand:vHyb256+B"], quick=True)
    last = {name: res["rows"][-1] for name, res in r["results"].items()}
    # the simulation of format v4 gives the shipped codec's figures (same maps, same kind of dither)
    assert abs(last["cand:v4sim"]["update_error"] / last["lowbit_8bit"]["update_error"] - 1) < 0.1, last
    assert abs(last["cand:vHyb256+B"]["v_bias"]) < 0.01 and 0 < last["cand:vHyb256+B"]["update_error"] < 0.05, last


def test_bucket_overhead_counts_the_buckets_it_divides_by(tmp_path):
    out = tmp_path / "b.json"
    script("bucket_overhead.py", "--count", "6", "--numel", "3000", "--bucket-mb", "0.01", "64", "--rounds", "1", "--out", str(out))
    data = json.loads(out.read_text())
    # 12 KB tensors against a 10 KB cap: each tensor is a bucket; 64 MiB holds all six
    assert data["buckets_per_backward"] == {"in backward, 0.01 MiB buckets": 6, "in backward, 64 MiB buckets": 1}
    assert set(data["median_ms"]) == {"plain", *data["buckets_per_backward"]} and data["cpu_model"]


def test_zero_blocks_flat_partitions_step_as_one_optimizer_over_the_concatenated_weights():
    import torch

    from lowbit_adamw import AdamW8bit
    from zero_blocks import Flat

    torch.manual_seed(0)
    shapes = [(7, 33), (100,), (300, 5), (3,)]  # blocks of 256 straddle every boundary
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    whole = torch.cat([p.detach().reshape(-1) for p in params])
    flat = Flat(params, 2, lr=1e-2, min_8bit_size=0)
    assert [p.numel() for p in flat.parts] == [917, 917]  # 1834 elements, two partitions
    # the reference: one optimizer over the concatenation cut at the same place, given the concatenated gradients
    ref_parts = [torch.nn.Parameter(whole[:917].clone()), torch.nn.Parameter(whole[917:].clone())]
    ref = AdamW8bit(ref_parts, lr=1e-2, min_8bit_size=0)
    for _ in range(3):
        grads = [torch.randn(s) for s in shapes]
        for p, g in zip(params, grads):
            p.grad = g
        flat.step()
        g = torch.cat([x.reshape(-1) for x in grads])
        ref_parts[0].grad, ref_parts[1].grad = g[:917].clone(), g[917:].clone()
        ref.step()
        assert torch.equal(torch.cat([p.detach().reshape(-1) for p in params]), torch.cat([p.detach() for p in ref_parts]))
    assert not torch.equal(torch.cat([p.detach().reshape(-1) for p in params]), whole)  # it did train


def test_flat_blocks_counts_blocks_and_tiles_with_map_b(tmp_path):
    import torch

    import flat_blocks
    from lowbit_adamw import AdamW8bit

    # a flat block (map B: negative v scale) in the first tile of two, and none in the second
    p = torch.nn.Parameter(torch.zeros(256 * 12))
    opt = AdamW8bit([p], min_8bit_size=0)
    p.grad = torch.cat([torch.ones(256), torch.randn(256 * 11) * 10.0 ** (-3 * torch.rand(256 * 11))])
    opt.step()
    assert (opt.state[p]["exp_avg_sq_absmax"] < 0).tolist() == [True] + [False] * 11
    assert flat_blocks.flat_counts(opt, 8) == dict(blocks=12, flat_blocks=1, tiles=2, tiles_with_a_flat_block=1)
    rows = flat_blocks.run(3, 8, dict(dim=32, layers=1, seq_len=32), report_at=(2,))
    assert [r["step"] for r in rows] == [2, 3] and rows[-1]["blocks"] > 0
