"""Memory reports: the estimate must match what each real optimizer holds (within 1%; it is exact
on these models), on the CPU, for ours and for bitsandbytes and torchao."""
import json
import os
import subprocess
import sys

import pytest
import torch

from helpers import tiny_model
from lowbit_adamw import AdamW8bit, memory
from lowbit_adamw.memory import MemoryMonitor, estimate, measure, optimizer_state_bytes

ALL = list(memory.OPTIMIZERS)


def available(names):
    out = []
    for n in names:
        mod = {"bnb_8bit": "bitsandbytes", "torchao_8bit": "torchao.optim"}.get(n)
        if mod:
            try:
                __import__(mod)
            except Exception:
                continue
        out.append(n)
    return out


def _check_agreement(model, monkeypatch, dtype=None, batch=None):
    names = available(ALL)
    est = estimate(model, names, dtype=dtype)
    # torchao compiles its step once per parameter shape (15-30 s a model with a cold inductor cache) for no byte
    # of state: its state tensors are made before the compiled call, and the same run eagerly
    monkeypatch.setattr(torch, "compile", lambda fn, **_: fn)
    mea = measure(model, names, steps=2, dtype=dtype, batch=batch)
    for e, m in zip(est.rows, mea.rows):
        assert e.optimizer == m.optimizer
        assert abs(e.state - m.state) <= 0.01 * m.state, (e.optimizer, e.state, m.state)
        for k in ("state_codes", "state_scales", "state_full", "state_other", "weights", "grads"):
            assert getattr(e, k) == getattr(m, k), (e.optimizer, k)
    return est, mea


def test_estimate_matches_measured_tinylm_fp32(monkeypatch):
    # Awkward sizes on purpose: torchao keeps fp32 state for tensors not divisible by 256.
    est, mea = _check_agreement(tiny_model(dim=48, layers=2, seq_len=40), monkeypatch)
    assert est.row("adamw").state_full == 8 * est.trainable
    assert mea.row("lowbit_8bit").activations > 0
    assert len({r.activations for r in mea.rows}) == 1  # same model, same batch: same activations
    # 4-bit: half the code bytes of 8-bit, twice the scales (blocks of 128 instead of 256)
    assert 2 * est.row("lowbit_4bit").state_codes == est.row("lowbit_8bit").state_codes
    assert est.row("lowbit_4bit").state_scales == 2 * est.row("lowbit_8bit").state_scales


def test_estimate_matches_measured_llama_bf16(monkeypatch):
    pytest.importorskip("transformers")
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=96, intermediate_size=200, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))
    est, _ = _check_agreement(model, monkeypatch, dtype=torch.bfloat16)
    assert est.meta["dtype"] == "torch.bfloat16"
    assert next(model.parameters()).dtype == torch.float32  # the caller's module was not cast
    # fp32 state for embeddings costs exactly the embedding's 8-bit state swapped for 8 B/element.
    emb = model.model.embed_tokens.weight.numel()
    lb, lb32 = est.row("lowbit_8bit"), est.row("lowbit_8bit_emb32")
    assert lb32.state_full - lb.state_full == 8 * emb


def test_meta_estimate_of_a_70b_config_is_free_and_sane():
    pytest.importorskip("transformers")
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rep = estimate("llama-3-70b", ["adamw", "lowbit_8bit"], dtype=torch.bfloat16)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 500 * 1024  # < 500 MiB, not 140 GB
    assert 70.0e9 < rep.params < 71.0e9
    lb = rep.row("lowbit_8bit")
    assert 2.03 <= lb.state / rep.trainable <= 2.04
    assert rep.row("adamw").state_full == 2 * 2 * rep.trainable  # torch keeps bf16 moments for bf16 weights
    assert lb.weights == lb.grads == 2 * rep.params
    assert "GiB" in rep.table().splitlines()[0]


def test_config_json_path(tmp_path):
    pytest.importorskip("transformers")
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4)
    cfg.save_pretrained(tmp_path)
    rep = estimate(str(tmp_path / "config.json"), ["lowbit_8bit"])
    assert rep.params == sum(p.numel() for p in LlamaForCausalLM(cfg).parameters())
    with pytest.raises(ValueError, match="unknown model 'nope'.*config.json"):
        estimate("nope")
    with pytest.raises(ValueError, match="unknown optimizer 'sgd'"):
        estimate(tiny_model(), ["sgd"])


def test_state_bytes_counts_kinds_for_our_state():
    model = tiny_model(dim=64)
    opt = AdamW8bit(model.parameters(), min_8bit_size=1024)
    x = torch.randint(0, 256, (2, 33))
    model.loss(x[:, :-1], x[:, 1:]).backward()
    opt.step()
    s = optimizer_state_bytes(opt)
    big = [p for p in model.parameters() if p.numel() >= 1024]
    small = [p for p in model.parameters() if p.numel() < 1024]
    assert s["codes"] == 2 * sum(p.numel() for p in big)
    assert s["scales"] == 2 * 4 * sum(-(-p.numel() // 256) for p in big)
    assert s["full"] == 2 * 4 * sum(p.numel() for p in small)
    assert s["other"] == 4 * len(list(model.parameters()))


def test_the_monitor_finds_state_whose_group_was_emptied_as_zero3_does():
    """DeepSpeed's ZeRO-3 puts a rank's flat partition into a param group only for the length of its step and
    empties the group after: the parameters, their bytes and the causes of full-precision state are still
    found through the optimizer's state (the ZeRO-3 Trainer test in test_deepspeed.py runs the real thing)."""
    from lowbit_adamw.memory.state import full_state_causes, optimizer_params

    torch.manual_seed(0)
    model = tiny_model()
    opt = AdamW8bit(model.parameters())
    mon = MemoryMonitor(opt)
    x = torch.randint(0, 256, (4, 33))
    model.loss(x[:, :-1], x[:, 1:]).backward()
    opt.step()
    before, causes = mon.report().to_dict(), full_state_causes(opt)
    assert causes["min_8bit_size"]["tensors"] > 0
    lists = [g["params"] for g in opt.param_groups]
    for g in opt.param_groups:
        g["params"] = []
    assert set(optimizer_params(opt)) == {id(p) for p in model.parameters()}
    after = mon.report().to_dict()
    for key in ("params", "trainable", "full_state_causes"):
        assert after[key] == before[key], key
    for key in ("weights", "grads", "state_codes", "state_full"):
        assert after["rows"][0][key] == before["rows"][0][key] > 0, key
    assert mon.record()["peak_bytes"] == mon.history[0]["peak_bytes"]
    # groups whose placement options differ cannot tell which one a stray tensor was in: no cause is guessed
    for g, params in zip(opt.param_groups, lists):
        g["params"] = params
    opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(8))], "min_8bit_size": 0})
    for g in opt.param_groups:
        g["params"] = []
    assert full_state_causes(opt) == {}


def test_monitor_report_says_why_tensors_keep_full_state():
    """The report counts the full-precision state by its cause (tests/test_accelerate_fsdp2.py has the
    sharded-rows cause under FSDP2)."""
    model = tiny_model()
    emb = [m for m in model.modules() if isinstance(m, torch.nn.Embedding)]
    opt = AdamW8bit(model.parameters(), fp32_state=emb)
    mon = MemoryMonitor(opt, model=model)
    x = torch.randint(0, 256, (4, 33))
    model.loss(x[:, :-1], x[:, 1:]).backward()
    opt.step()
    small = [p for p in model.parameters() if p.numel() < 4096]
    want = {"fp32_state": {"tensors": len(emb), "bytes": 8 * sum(m.weight.numel() for m in emb)},
            "min_8bit_size": {"tensors": len(small), "bytes": 8 * sum(p.numel() for p in small)}}
    rep = mon.report()
    assert rep.to_dict()["full_state_causes"] == want
    assert sum(c["bytes"] for c in want.values()) == optimizer_state_bytes(opt)["full"]
    assert f"full-precision state kept for: {len(emb)} tensor(s) by fp32_state" in rep.table()


def test_monitor_in_a_plain_loop_writes_json_and_png(tmp_path):
    model = tiny_model()
    opt = AdamW8bit(model.parameters())
    mon = MemoryMonitor(opt, model=model)
    x = torch.randint(0, 256, (4, 33))
    for _ in range(3):
        opt.zero_grad()
        model.loss(x[:, :-1], x[:, 1:]).backward()
        opt.step()
    assert [h["step"] for h in mon.history] == [1, 2, 3]
    assert all(h["state_bytes"] == optimizer_state_bytes(opt)["total"] for h in mon.history)
    weights = sum(p.numel() * 4 for p in model.parameters())
    assert mon.history[-1]["peak_bytes"] == 2 * weights + optimizer_state_bytes(opt)["total"]  # CPU: weights + grads + state
    js, png = mon.write(str(tmp_path / "mem"))
    data = json.load(open(js))
    assert data["mode"] == "measured" and len(data["rows"][0]["history"]) == 3
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    mon.close()
    opt.step()
    assert len(mon.history) == 3  # detached


def test_trainer_callback_logs_and_writes_report(tmp_path):
    pytest.importorskip("transformers")
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    from lowbit_adamw.integrations.transformers import memory_report_callback, optimizer_cls_and_kwargs

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4))
    ids = torch.randint(0, 256, (16, 32))
    ds = [{"input_ids": r, "labels": r} for r in ids]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, logging_steps=1,
                             report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True)
    cb = memory_report_callback()
    logged = []

    class Keep(__import__("transformers").TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            logged.append(dict(logs))

    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[cb, Keep()],
                      optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(args, model))
    trainer.train()
    steps = [l for l in logged if "loss" in l]
    assert len(steps) == 3 and all("optimizer_state_mib" in l and "peak_mib" in l for l in steps)
    data = json.load(open(tmp_path / "memory_report.json"))
    assert data["rows"][0]["label"] == "AdamW8bit" and len(data["rows"][0]["history"]) == 3
    assert os.path.getsize(tmp_path / "memory_report.png") > 1000


def test_cli_memory_subcommand(tmp_path):
    out = subprocess.run([sys.executable, "-P", "-m", "lowbit_adamw", "memory", "--model", "tinylm", "--optimizers",
                          "adamw,lowbit_8bit,lowbit_8bit_amsgrad", "--measure", "--steps", "1", "--json", str(tmp_path / "m.json"),
                          "--png", str(tmp_path / "m.png")], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "largest difference 0.000%" in out.stdout
    data = json.load(open(tmp_path / "m.json"))
    assert [r["mode"] for r in data["reports"]] == ["estimate", "measured"]
    assert (tmp_path / "m.png").exists() and (tmp_path / "m-measured.png").exists()
    bad = subprocess.run([sys.executable, "-P", "-m", "lowbit_adamw", "memory", "--optimizers", "sgd"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown optimizer(s) sgd" in bad.stderr
    bad = subprocess.run([sys.executable, "-P", "-m", "lowbit_adamw", "memory", "--model", "nope"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown model 'nope'" in bad.stderr and "Traceback" not in bad.stderr


def test_report_states_what_gradient_accumulation_costs():
    model = tiny_model()
    opt = AdamW8bit(model.parameters(), accumulation_steps=2)
    mon = MemoryMonitor(opt, model=model)
    x = torch.randint(0, 256, (2, 33))
    for _ in range(2):
        model.loss(x[:, :-1], x[:, 1:]).backward()
        opt.step()
        opt.zero_grad()
    rep = mon.report()
    assert rep.meta["gradient_accumulation"]["extra_bytes"] == 0
    assert "gradient accumulation over 2 micro-steps: 0 extra bytes" in rep.table()
    assert len(mon.history) == 1  # the hook fires once per real update


# ---- does it fit (lowbit_adamw.memory.fit) ------------------------------------------------------------


def _tiny_llama():
    import sys

    recipes = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes")
    sys.path.insert(0, recipes)
    try:
        from recipe_utils import tiny_llama
    finally:
        sys.path.remove(recipes)
    return tiny_llama(seed=0, hidden=64)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_activations_counted_on_fake_tensors_equal_a_real_forward(checkpointing):
    pytest.importorskip("transformers")
    from lowbit_adamw.memory.fit import activation_bytes
    from lowbit_adamw.memory import _SavedBytes

    model = _tiny_llama()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    ids = torch.randint(0, 256, (2, 48))
    with _SavedBytes() as saved:
        model(input_ids=ids, labels=ids).loss.backward()
    assert activation_bytes(_tiny_llama(), 2, 48, checkpointing) == saved.bytes > 0
    if not checkpointing:  # and measure() counts the same way on its default batch (4 x 64)
        from lowbit_adamw import memory

        assert memory.measure(_tiny_llama(), ["lowbit_8bit"], steps=1).rows[0].activations == activation_bytes(_tiny_llama(), 4, 64)


def test_fit_report_rows_and_gpu_line(tmp_path):
    pytest.importorskip("transformers")
    from lowbit_adamw.memory.fit import fit_report, parse_size
    from lowbit_adamw.memory import estimate

    assert parse_size("24GiB") == parse_size("24GB") == parse_size("24G") == 24 * 2**30 and parse_size("512MiB") == 2**29
    with pytest.raises(ValueError, match="24GiB"):
        parse_size("lots")
    r = fit_report("llama-2-7b", "24GiB", batch=1, seq=2048, checkpointing=True, dtype=torch.bfloat16)
    rows = {x.config: x for x in r.rows}
    est = estimate("llama-2-7b", ["adamw", "lowbit_8bit"], dtype=torch.bfloat16)
    assert rows["adamw"].state == est.row("adamw").state and rows["lowbit_8bit"].state == est.row("lowbit_8bit").state
    assert rows["lowbit_8bit"].grads == est.row("lowbit_8bit").grads
    largest = 32000 * 4096 * 2
    assert rows["lowbit_8bit_sib"].grads == 64 * 2**20 + largest  # one bucket plus the largest gradient
    acts_ckpt = rows["adamw"].activations
    no_ckpt = fit_report("llama-2-7b", "24GiB", batch=1, seq=2048, dtype=torch.bfloat16).rows[0].activations
    assert 0 < acts_ckpt < no_ckpt / 10
    # 7B in bf16 does not fit 24 GiB with 8-bit state even with the step in backward; 4-bit state closes the gap
    assert [r.fits(x) for x in r.rows] == [False, False, False, True]
    est4 = estimate("llama-2-7b", ["lowbit_4bit"], dtype=torch.bfloat16).row("lowbit_4bit")
    assert rows["lowbit_4bit_sib"].state == est4.state < 0.53 * rows["lowbit_8bit_sib"].state
    big = fit_report("llama-2-7b", "80GiB", batch=1, seq=2048, checkpointing=True, dtype=torch.bfloat16)
    assert all(big.fits(x) for x in big.rows)
    assert "| lowbit AdamW8bit + step in backward |" in r.table() and r.table().count("| no |") == 3 and "| lowbit bits=4 + step in backward |" in r.table()
    png = r.plot(str(tmp_path / "fit.png"))
    assert os.path.getsize(png) > 1000


def test_fit_report_with_host_memory_adds_the_offload_rows():
    pytest.importorskip("transformers")
    from lowbit_adamw.memory import estimate
    from lowbit_adamw.memory.fit import OFFLOAD_CONFIGS, STAGING_BUFFERS, fit_report

    r = fit_report("llama-2-7b", "16GiB", batch=1, seq=2048, checkpointing=True, dtype=torch.bfloat16, host_memory="32GiB")
    rows = {x.config: x for x in r.rows}
    assert set(OFFLOAD_CONFIGS) <= set(rows)
    assert "lowbit_8bit_offload" not in {x.config for x in fit_report("llama-2-7b", "16GiB", dtype=torch.bfloat16).rows}
    ours = rows["lowbit_8bit_offload"]
    state = estimate("llama-2-7b", ["lowbit_8bit"], dtype=torch.bfloat16).row("lowbit_8bit").state
    # host: the state, the host copy of the weights, the staging buffers; the GPU keeps no state
    assert ours.state == 0 and ours.host == state + ours.weights + STAGING_BUFFERS * ours.grads
    numel = ours.weights // 2
    assert rows["deepspeed_offload"].host == 16 * numel and rows["torchao_offload"].host == 8 * numel  # bf16: 2 B x 4
    fits = {k: r.fits(x) for k, x in rows.items()}
    # 7B bf16 full fine-tune on a 16 GiB card with 32 GiB of host RAM: only our offloaded rows fit both sides
    assert fits == {**{k: False for k in rows}, "lowbit_8bit_offload": True, "lowbit_4bit_offload": True}
    assert rows["torchao_offload"].total <= r.gpu_memory  # it fits the GPU; the host is what it lacks
    table = r.table()
    assert "host RAM" in table and "host 32.00 GiB" in table


def test_cli_memory_fit_table(tmp_path, capsys):
    pytest.importorskip("transformers")
    from lowbit_adamw.cli import main

    out = tmp_path / "fit.json"
    assert main(["memory", "llama-3.2-1b", "--dtype", "bf16", "--gpu-memory", "24GiB", "--batch", "1", "--seq", "512",
                 "--checkpointing", "--json", str(out), "--png", str(tmp_path / "fit.png")]) == 0
    text = capsys.readouterr().out
    assert "fits" in text and "step in backward" in text
    fit = json.loads(out.read_text())["fit"]
    assert fit["model"] == "llama-3.2-1b" and fit["checkpointing"] and all(row["fits"] for row in fit["rows"])
    assert (tmp_path / "fit.png").stat().st_size > 1000


# ---- the command line as a new user meets it --------------------------------------------------


@pytest.mark.parametrize("spec", ["meta-llama/Llama-2-7b-hf", "LLAMA-2-7B", "Llama-2-7b-chat-hf", "meta-llama/llama-2-7b"])
def test_hub_ids_and_any_case_map_to_the_built_in_shape(spec):
    pytest.importorskip("transformers")
    from lowbit_adamw.memory import load_model
    from lowbit_adamw.memory.catalog import builtin_name

    assert builtin_name(spec) == "llama-2-7b"
    assert sum(p.numel() for p in load_model(spec).parameters()) == 6_738_415_616


def test_unknown_hub_id_is_refused_naming_what_works():
    pytest.importorskip("transformers")
    from lowbit_adamw.memory import load_model

    with pytest.raises(ValueError, match="config.json"):
        load_model("nobody/no-such-model-anywhere")


def test_encoder_config_is_sized_as_its_own_class(tmp_path):
    pytest.importorskip("transformers")
    from lowbit_adamw.memory import estimate, load_model

    cfg = dict(model_type="bert", hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
               vocab_size=500)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert type(load_model(str(tmp_path / "config.json"))).__name__ == "BertForMaskedLM"  # not BertLMHeadModel
    (tmp_path / "config.json").write_text(json.dumps(dict(cfg, architectures=["BertModel"])))
    assert type(load_model(str(tmp_path))).__name__ == "BertModel"
    assert estimate(str(tmp_path), ["lowbit_8bit"]).params == sum(p.numel() for p in load_model(str(tmp_path)).parameters())


def test_built_in_llms_default_to_bf16_and_configs_to_their_dtype(tmp_path, capsys):
    pytest.importorskip("transformers")
    from lowbit_adamw.cli import main
    from lowbit_adamw.memory.models import default_dtype

    assert default_dtype("meta-llama/Llama-2-7b-hf") == torch.bfloat16
    assert default_dtype("tinylm") is None
    (tmp_path / "config.json").write_text(json.dumps(dict(model_type="gpt2", n_embd=64, n_layer=1, n_head=2, vocab_size=300,
                                                          torch_dtype="float16")))
    assert default_dtype(str(tmp_path / "config.json")) == torch.float16
    assert main(["memory", "llama-2-7b", "--optimizers", "adamw"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert "bfloat16" in first
    assert main(["memory", "llama-2-7b", "--optimizers", "adamw", "--dtype", "fp32"]) == 0
    assert "float32" in capsys.readouterr().out.splitlines()[0]


def test_help_does_not_import_torch():
    code = ("import sys\nfrom lowbit_adamw.cli import main\n"
            "for argv in (['--help'], ['memory', '--help'], ['convert', '--help']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))[:5]\n")
    out = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "convert" in out.stdout and "--gpu-memory" in out.stdout


def test_measure_reports_progress_per_step():
    seen = []
    measure("tinylm", ["adamw", "lowbit_8bit"], steps=2, progress=seen.append)
    assert seen == ["adamw", "adamw", "lowbit_8bit", "lowbit_8bit"]


def test_fit_chart_writes_its_numbers_on_the_bars():
    pytest.importorskip("transformers")
    pytest.importorskip("matplotlib")
    from lowbit_adamw.memory.fit import fit_report

    r = fit_report("llama-2-7b", "24GiB", batch=1, seq=2048, checkpointing=True, dtype=torch.bfloat16)
    fig = r.figure()
    texts = [t.get_text() for t in fig.axes[0].texts]
    for row in r.rows:
        assert f"{row.total / 2**30:.1f} GiB" in texts
    assert f"{r.rows[0].weights / 2**30:.1f}" in texts  # the weights part of the first bar


def test_cli_png_without_matplotlib_names_the_extra_and_keeps_the_table_and_json(tmp_path, capsys, monkeypatch):
    from lowbit_adamw.cli import main

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # an install without the cli extra
    out, png = tmp_path / "m.json", tmp_path / "m.png"
    assert main(["memory", "--model", "tinylm", "--optimizers", "adamw,lowbit_8bit", "--json", str(out), "--png", str(png)]) == 1
    captured = capsys.readouterr()
    assert "pip install 'lowbit-adamw[cli]'" in captured.err and "Traceback" not in captured.err
    assert captured.out.startswith("tinylm: ") and json.loads(out.read_text())["reports"][0]["mode"] == "estimate"
    assert not png.exists()
