"""HF Trainer, Lightning, GradScaler and config-driven construction. Trainer runs that must not
share process state (install(), resume) run the recipe in a subprocess."""
import json
import os
import subprocess
import sys

import pytest
import torch

from helpers import data, tiny_model
from lowbit_adamw import AdamW8bit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = os.path.join(ROOT, "recipes")

transformers = pytest.importorskip("transformers")


def run_recipe(args, tmp_path, module_runner=False):
    report = tmp_path / f"report_{len(list(tmp_path.iterdir()))}.json"
    # -P keeps the repo root off sys.path for -m (our kernels/ would shadow PyPI's "kernels"); a plain
    # script run puts only recipes/ on it.
    cmd = [sys.executable] + (["-P", "-m", "lowbit_adamw.integrations.transformers"] if module_runner else [])
    cmd += [os.path.join(RECIPES, args[0])] + list(args[1:]) + ["--report-out", str(report)]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TOKENIZERS_PARALLELISM="false")
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return json.loads(report.read_text()), out.stdout


def training_args(tmp_path, **kw):
    from transformers import TrainingArguments

    base = dict(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none", learning_rate=2e-3,
                weight_decay=0.05, adam_beta1=0.8, adam_beta2=0.99, adam_epsilon=1e-7)
    base.update(kw)
    return TrainingArguments(**base)


def llama():
    sys.path.insert(0, RECIPES)
    try:
        from recipe_utils import tiny_llama
    finally:
        sys.path.remove(RECIPES)
    return tiny_llama(seed=0, hidden=64)


def test_cls_and_kwargs_follow_training_args_and_trainer_groups(tmp_path):
    from transformers import Trainer

    from lowbit_adamw.optim import placement

    from lowbit_adamw.integrations.transformers import optimizer_cls_and_kwargs

    model = llama()
    args = training_args(tmp_path, optim_args="block_size=128, min_8bit_size=1024, stochastic_rounding=true")
    cls, kw = optimizer_cls_and_kwargs(args, model)
    assert cls is AdamW8bit
    assert kw["lr"] == 2e-3 and kw["betas"] == (0.8, 0.99) and kw["eps"] == 1e-7
    assert kw["block_size"] == 128 and kw["min_8bit_size"] == 1024 and kw["stochastic_rounding"] is True
    opt = Trainer(model=model, args=args, optimizer_cls_and_kwargs=(cls, kw)).create_optimizer()
    assert isinstance(opt, AdamW8bit)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]
    names = dict(model.named_parameters())
    no_decay = {id(p) for p in opt.param_groups[1]["params"]}
    assert id(names["model.norm.weight"]) in no_decay and id(names["lm_head.weight"]) not in no_decay
    # Trainer's bitsandbytes embedding policy: fp32 state for nn.Embedding weights, 8-bit for the rest.
    emb, head = names["model.embed_tokens.weight"], names["lm_head.weight"]
    assert emb.numel() >= 1024 and not placement.wants_8bit(opt, emb, opt.param_groups[0])
    assert placement.wants_8bit(opt, head, opt.param_groups[0])
    _, kw_off = optimizer_cls_and_kwargs(args, model, embedding_fp32=False)
    assert "fp32_state" not in kw_off


def test_optim_args_errors_name_the_option():
    from lowbit_adamw.integrations.transformers import parse_optim_args

    with pytest.raises(ValueError, match="unknown option 'blocksize'"):
        parse_optim_args("blocksize=128")
    with pytest.raises(ValueError, match="stochastic_rounding='maybe' is not a boolean"):
        parse_optim_args("stochastic_rounding=maybe")
    assert parse_optim_args(None) == {}


ROUTED = {"adamw_8bit": 8, "adamw_bnb_8bit": 8, "paged_adamw_8bit": 8, "adamw_torch_8bit": 8, "adamw_torch_4bit": 4}
LEFT = ("paged_adamw_32bit", "lion_8bit", "paged_lion_8bit", "ademamix_8bit", "rmsprop_bnb_8bit")


def test_install_routes_every_8bit_adamw_string_and_leaves_the_others(tmp_path, caplog):
    from transformers import Trainer

    from lowbit_adamw.integrations import transformers as hf

    model = llama()
    hf.install()
    try:
        for name, bits in ROUTED.items():
            cls, kw = Trainer.get_optimizer_cls_and_kwargs(training_args(tmp_path, optim=name), model)
            assert cls is AdamW8bit and kw.get("bits", 8) == bits, name
            assert any(name in r.getMessage() and "in place of" in r.getMessage() for r in caplog.records), name
        # the user's optim_args win over a route's own setting
        _, kw = Trainer.get_optimizer_cls_and_kwargs(training_args(tmp_path, optim="adamw_torch_4bit", optim_args="bits=8"), model)
        assert kw["bits"] == 8
        assert Trainer.get_optimizer_cls_and_kwargs(training_args(tmp_path, optim="adamw_torch"), model)[0] is torch.optim.AdamW
        for name in LEFT:
            assert hf.left_to_owner(name) and name not in hf.ROUTES
            with pytest.raises(ValueError, match=f"{name!r} is left to its owner"):
                hf.install(optim_names=(name,))
        with pytest.raises(ValueError, match="'adamw_9bit' is not an 8-bit AdamW string"):
            hf.install(optim_names=("adamw_9bit",))
        hf.install(optim_names=("adamw_torch_4bit",))  # adds to the default set (already in it): nothing is lost
        assert Trainer.get_optimizer_cls_and_kwargs(training_args(tmp_path, optim="adamw_8bit"), model)[0] is AdamW8bit
        opt = Trainer(model=model, args=training_args(tmp_path, optim="adamw_8bit")).create_optimizer()
        assert isinstance(opt, AdamW8bit) and len(opt.param_groups) == 2
        hf.install()  # idempotent: a second install must not wrap the wrapper
    finally:
        hf.uninstall()
    cls, _ = Trainer.get_optimizer_cls_and_kwargs(training_args(tmp_path, optim="adamw_8bit"), model)
    assert cls is not AdamW8bit and "bitsandbytes" in cls.__module__


def _without_peers(tmp_path):
    """An environment in which bitsandbytes and torchao cannot be imported (a sitecustomize blocks them)."""
    site = tmp_path / "no_peers"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text("import sys\nfor _m in ('bitsandbytes', 'torchao'):\n    sys.modules[_m] = None\n")
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(site)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))


def test_install_takes_every_routed_string_without_bitsandbytes_or_torchao(tmp_path):
    script = (
        "import importlib, torch\n"
        "from transformers import Trainer, TrainingArguments\n"
        "from lowbit_adamw import AdamW8bit\n"
        "from lowbit_adamw.integrations import transformers as hf\n"
        "for m in ('bitsandbytes', 'torchao'):\n"
        "    try:\n        importlib.import_module(m)\n        raise SystemExit(m + ' importable')\n"
        "    except ImportError:\n        pass\n"
        "hf.install()\n"
        "model = torch.nn.Sequential(torch.nn.Linear(64, 80))\n"
        f"for name, bits in {ROUTED!r}.items():\n"
        "    a = TrainingArguments(output_dir=%r, use_cpu=True, report_to='none', optim=name)\n"
        "    opt = Trainer(model=model, args=a).create_optimizer()\n"
        "    opt = getattr(opt, 'optimizer', opt)\n"
        "    assert type(opt) is AdamW8bit and opt.param_groups[0]['bits'] == bits, name\n"
        "print('routed', len(%r))\n" % (str(tmp_path / "o"), ROUTED)
    )
    out = subprocess.run([sys.executable, "-P", "-c", script], env=_without_peers(tmp_path), capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and "routed 5" in out.stdout, out.stdout[-2000:] + out.stderr[-3000:]


@pytest.mark.parametrize("optim", ["paged_adamw_8bit", "adamw_torch_4bit"])
def test_wrapper_runs_a_script_without_bitsandbytes_or_torchao(tmp_path, optim):
    report = tmp_path / "report.json"
    cmd = [sys.executable, "-P", "-m", "lowbit_adamw.integrations.transformers", "--lowbit-optim-names", optim,
           os.path.join(RECIPES, "hf_trainer_finetune.py"), "--route", "plain", "--optim", optim, "--steps", "2",
           "--output-dir", str(tmp_path / "o"), "--report-out", str(report)]
    env = dict(_without_peers(tmp_path), CUDA_VISIBLE_DEVICES="", TOKENIZERS_PARALLELISM="false")
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    got = json.loads(report.read_text())
    assert got["optimizer"] == "lowbit_adamw.optimizer.AdamW8bit" and set(got["group_bits"]) == {ROUTED[optim]}
    assert f"optim={optim!r} runs lowbit_adamw.AdamW8bit" in out.stderr


def test_wrapper_refuses_a_string_left_to_its_owner():
    from lowbit_adamw.integrations import transformers as hf

    with pytest.raises(ValueError, match="'lion_8bit' is left to its owner: Lion is not AdamW"):
        hf.main(["--lowbit-optim-names", "lion_8bit", "train.py"])


def test_install_fails_loudly_if_transformers_changes(monkeypatch):
    from transformers import Trainer

    from lowbit_adamw.integrations import transformers as hf

    monkeypatch.setattr(Trainer, "get_optimizer_cls_and_kwargs", lambda self, args, model=None: None)
    with pytest.raises(RuntimeError, match="no longer a static method.*optimizer_cls_and_kwargs"):
        hf.install()


def test_unmodified_adamw_8bit_script_runs_on_lowbit(tmp_path):
    report, _ = run_recipe(["hf_trainer_finetune.py", "--route", "plain", "--steps", "3", "--output-dir", str(tmp_path / "o")],
                           tmp_path, module_runner=True)
    assert report["optimizer"] == "lowbit_adamw.optimizer.AdamW8bit"
    assert report["fp32_state_params"][0] == "model.embed_tokens.weight"


def test_trainer_resume_in_new_process_matches_uninterrupted_run(tmp_path):
    out = tmp_path / "run"
    full, _ = run_recipe(["hf_trainer_finetune.py", "--steps", "6", "--save-steps", "3", "--output-dir", str(out)], tmp_path)
    # Trainer resumes with torch.load(optimizer.pt, weights_only=True): our state dict must pass that as is.
    sd = torch.load(out / "checkpoint-3" / "optimizer.pt", map_location="cpu", weights_only=True)
    assert any(k.endswith("_codes") and v.dtype == torch.uint8 for s in sd["state"].values() for k, v in s.items())
    resumed, _ = run_recipe(["hf_trainer_finetune.py", "--steps", "6", "--save-steps", "3", "--output-dir", str(tmp_path / "r"),
                             "--resume", str(out / "checkpoint-3")], tmp_path)
    assert list(resumed["losses"]) == ["4", "5", "6"]
    assert resumed["losses"] == {k: full["losses"][k] for k in ("4", "5", "6")}  # exact, not approximate


def test_trainer_grad_accumulation_bf16_clipping_cosine(tmp_path):
    report, stdout = run_recipe(["hf_trainer_finetune.py", "--steps", "4", "--grad-accum", "2", "--bf16", "--route", "install",
                                 "--output-dir", str(tmp_path / "o")], tmp_path)
    assert report["optimizer"] == "lowbit_adamw.optimizer.AdamW8bit"
    assert set(report["steps"].values()) == {4.0}  # one optimizer step per 2 micro-batches
    losses = [report["losses"][k] for k in ("1", "2", "3", "4")]
    assert all(l == l and l < 10 for l in losses) and losses[-1] < losses[0]
    assert "memory: optimizer state" in stdout


@pytest.mark.parametrize("recipe,args", [("plain_loop.py", ["--steps", "4", "--amp", "bf16"]), ("peft_lora.py", ["--steps", "4"]),
                                         ("fit_on_one_gpu.py", ["--steps", "4", "--hidden", "64", "--layers", "2", "--bucket-mb", "0.1"])])
def test_recipes_run(recipe, args):
    if recipe == "peft_lora.py":
        pytest.importorskip("peft")
    out = subprocess.run([sys.executable, os.path.join(RECIPES, recipe)] + args, cwd=ROOT, capture_output=True, text=True,
                         timeout=600, env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    assert out.returncode == 0, out.stderr[-3000:]
    losses = [float(line.split("loss")[1].split()[0]) for line in out.stdout.splitlines() if line.startswith("step")]
    assert losses and all(l == l for l in losses)
    assert "memory: optimizer state" in out.stdout
    if recipe == "fit_on_one_gpu.py":  # the step in backward kept most gradients from ever being alive together
        line = next(l for l in out.stdout.splitlines() if l.startswith("gradients alive"))
        alive, total = float(line.split(":")[1].split()[0]), float(line.split(" of ")[1].split()[0])
        assert 0 < alive < total / 2, line


# ---- Lightning ----------------------------------------------------------------------------------


def _lightning_module(L, model, lr):
    class LitLM(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = model

        def training_step(self, batch, batch_idx):
            x, y = batch
            return self.model.loss(x, y)

        def configure_optimizers(self):
            opt = AdamW8bit(self.parameters(), lr=lr, min_8bit_size=1024)
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    return LitLM()


def test_lightning_step_with_closure_matches_plain_loop():
    L = pytest.importorskip("lightning")
    steps, lr = 5, 3e-3
    it = data(seq_len=32)
    batches = [next(it) for _ in range(steps)]
    loader = torch.utils.data.DataLoader(batches, batch_size=None)

    lit = _lightning_module(L, tiny_model(seed=1), lr)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(lit, loader)

    ref = tiny_model(seed=1)
    opt = AdamW8bit(ref.parameters(), lr=lr, min_8bit_size=1024)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for x, y in batches:
        opt.zero_grad()
        ref.loss(x, y).backward()
        opt.step()
        sched.step()
    lit_opt = trainer.optimizers[0]
    assert isinstance(lit_opt, AdamW8bit)
    assert any("exp_avg_codes" in s for s in lit_opt.state.values())
    for a, b in zip(lit.model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_lightning_bf16_mixed_trains():
    L = pytest.importorskip("lightning")
    it = data(seq_len=32)
    loader = torch.utils.data.DataLoader([next(it) for _ in range(4)], batch_size=None)
    lit = _lightning_module(L, tiny_model(seed=2), 3e-3)
    before = [p.detach().clone() for p in lit.parameters()]
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=4, precision="bf16-mixed", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(lit, loader)
    assert all(not torch.equal(a, b) for a, b in zip(before, lit.parameters()))
    assert {float(s["step"]) for s in trainer.optimizers[0].state.values()} == {4.0}


# ---- GradScaler, zero_grad, config-driven construction ----------------------------------------


def test_grad_scaler_unscales_and_skips_on_inf():
    model, ref = tiny_model(seed=3), tiny_model(seed=3)
    opt = AdamW8bit(model.parameters(), lr=1e-2, min_8bit_size=1024)
    ref_opt = AdamW8bit(ref.parameters(), lr=1e-2, min_8bit_size=1024)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    it = data(seq_len=32)
    for step in range(3):
        x, y = next(it)
        scaler.scale(model.loss(x, y)).backward()
        ref.loss(x, y).backward()
        if step == 1:
            next(model.parameters()).grad[0] = float("inf")
        scaler.step(opt)
        scaler.update()
        if step != 1:
            ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
    # The inf step was skipped whole; the others saw exactly unscaled gradients (power-of-two scale).
    assert scaler.get_scale() == 2.0**11
    assert {float(s["step"]) for s in opt.state.values()} == {2.0}
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_config_component_instantiation_params_first():
    """torchtune-style configs call ``_component_(params, **kwargs)`` with YAML types (lists, floats)."""
    import importlib

    cfg = {"_component_": "lowbit_adamw.AdamW8bit", "lr": 2e-5, "betas": [0.9, 0.95], "weight_decay": 0.01, "block_size": 128}
    module, _, name = cfg["_component_"].rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    model = tiny_model()
    opt = cls(model.parameters(), **{k: v for k, v in cfg.items() if k != "_component_"})
    x, y = next(data())
    model.loss(x, y).backward()
    opt.step()
    assert opt.param_groups[0]["betas"] == [0.9, 0.95] and opt.param_groups[0]["block_size"] == 128
    assert all(float(s["step"]) == 1.0 for s in opt.state.values())


def test_trainer_step_in_backward_equals_the_plain_trainer(tmp_path):
    from transformers import Trainer

    from lowbit_adamw.integrations.transformers import optimizer_cls_and_kwargs

    sys.path.insert(0, RECIPES)
    try:
        from recipe_utils import byte_windows
    finally:
        sys.path.remove(RECIPES)
    ds = byte_windows(24, seq_len=32)
    finals = []
    for optim_args in ("min_8bit_size=1024", "min_8bit_size=1024,step_in_backward=true,step_in_backward_bucket_mb=0.05",
                       "min_8bit_size=1024,step_in_backward=true,step_in_backward_bucket_mb=0.05,offload=cpu"):
        model = llama()
        args = training_args(tmp_path / str(len(finals)), max_steps=3, per_device_train_batch_size=8, max_grad_norm=0.0,
                             optim_args=optim_args, logging_steps=1, save_strategy="no", disable_tqdm=True)
        trainer = Trainer(model=model, args=args, train_dataset=ds, optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(args, model))
        trainer.train()
        assert trainer.optimizer.optimizer.step_in_backward == ("step_in_backward" in optim_args)
        assert trainer.optimizer.optimizer.param_groups[0]["offload"] == ("cpu" if "offload" in optim_args else None)
        finals.append([p.detach().clone() for p in model.parameters()])
    for other in finals[1:]:
        assert all(torch.equal(a, b) for a, b in zip(finals[0], other))
    # Trainer's default max_grad_norm=1.0 would clip gradients that no longer exist: refused, with the fix
    with pytest.raises(ValueError, match="max_grad_norm=0"):
        optimizer_cls_and_kwargs(training_args(tmp_path, optim_args="step_in_backward=true"), llama())
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        optimizer_cls_and_kwargs(training_args(tmp_path, optim_args="step_in_backward=true", max_grad_norm=0.0,
                                               gradient_accumulation_steps=2), llama())


def _update_gap(resumed, full, start):
    """|(w_resumed - w_start) - (w_full - w_start)| / |w_full - w_start| over all weights: how far the resumed
    updates are from the uninterrupted run's."""
    from safetensors.torch import load_file

    a, b, base = (load_file(d / "model.safetensors") for d in (resumed, full, start))
    gap = sum(float(((a[k] - b[k])).double().norm() ** 2) for k in a) ** 0.5
    return gap / sum(float((b[k] - base[k]).double().norm() ** 2) for k in b) ** 0.5


def _close(a: dict, b: dict, steps, rel):
    return all(abs(a[k] - b[k]) <= rel * abs(b[k]) for k in steps)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Paged optimizers")
def test_trainer_resumes_a_bitsandbytes_run_under_lowbit(tmp_path):
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "bnb"
    full, _ = run_recipe(["hf_trainer_finetune.py", "--route", "plain", "--optim", "adamw_bnb_8bit", "--steps", "6",
                          "--save-steps", "3", "--output-dir", str(out)], tmp_path)
    assert full["optimizer"] == "bitsandbytes.optim.adamw.AdamW"  # Trainer: AdamW with optim_bits=8
    report = tmp_path / "resumed.json"
    cmd = [sys.executable, "-P", "-m", "lowbit_adamw.integrations.transformers", os.path.join(RECIPES, "hf_trainer_finetune.py"),
           "--route", "plain", "--optim", "adamw_bnb_8bit", "--steps", "6", "--save-steps", "3",
           "--output-dir", str(tmp_path / "r"), "--resume", str(out / "checkpoint-3"), "--report-out", str(report)]
    res = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, CUDA_VISIBLE_DEVICES=""), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "converted a bitsandbytes AdamW state dict" in res.stderr
    resumed = json.loads(report.read_text())
    assert resumed["optimizer"] == "lowbit_adamw.optimizer.AdamW8bit"
    assert list(resumed["losses"]) == ["4", "5", "6"]
    # the moments came across: a fresh state (step 1 again) would show in the loss at steps 4-6
    assert _close(resumed["losses"], full["losses"], ("4", "5", "6"), 0.01), (resumed["losses"], full["losses"])
    # and the weights: 1.4% (torch 0.4%, bnb 2.0%) apart in the updates of steps 4-6 here; losing the moments gives 105%
    assert _update_gap(tmp_path / "r" / "checkpoint-6", out / "checkpoint-6", out / "checkpoint-3") < 0.1
    assert set(resumed["steps"].values()) == {6.0}
    # and the weights: 1.4% (torch 0.4%, bnb 2.0%) apart in the updates of steps 4-6 here; losing the moments gives 105%
    assert _update_gap(tmp_path / "r" / "checkpoint-6", out / "checkpoint-6", out / "checkpoint-3") < 0.1


@pytest.fixture(scope="module")
def lowbit_run(tmp_path_factory):
    """One lowbit Trainer run of 6 steps with a checkpoint at 3, shared by the conversion tests."""
    tmp = tmp_path_factory.mktemp("lowbit_run")
    out = tmp / "lowbit"
    full, _ = run_recipe(["hf_trainer_finetune.py", "--route", "install", "--steps", "6", "--save-steps", "3",
                          "--output-dir", str(out)], tmp)
    return out, full


@pytest.mark.slow
@pytest.mark.parametrize("to,optim,cls", [("torch", "adamw_torch", "torch.optim.adamw.AdamW"),
                                          ("bnb", "adamw_bnb_8bit", "bitsandbytes.optim.adamw.AdamW")])
def test_lowbit_checkpoint_converted_resumes_in_another_optimizer(tmp_path, lowbit_run, to, optim, cls):
    if to == "bnb":
        pytest.importorskip("bitsandbytes")
    import shutil

    out, full = lowbit_run
    ckpt = tmp_path / "ckpt"
    shutil.copytree(out / "checkpoint-3", ckpt)
    conv = subprocess.run([sys.executable, "-P", "-m", "lowbit_adamw", "convert", str(ckpt), "--to", to], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert conv.returncode == 0, conv.stderr[-3000:]
    assert (ckpt / "optimizer.lowbit.pt").exists()
    resumed, _ = run_recipe(["hf_trainer_finetune.py", "--route", "plain", "--optim", optim, "--steps", "6", "--save-steps", "3",
                             "--output-dir", str(tmp_path / "r"), "--resume", str(ckpt)], tmp_path)
    assert resumed["optimizer"] == cls
    assert list(resumed["losses"]) == ["4", "5", "6"]
    assert _close(resumed["losses"], full["losses"], ("4", "5", "6"), 0.01), (resumed["losses"], full["losses"])
    # and the weights: torch 0.4%, bitsandbytes 2.0% apart in the updates of steps 4-6 here
    assert _update_gap(tmp_path / "r" / "checkpoint-6", out / "checkpoint-6", out / "checkpoint-3") < 0.1


def test_a_ckpt_step_the_run_never_reaches_is_refused():
    sys.path.insert(0, RECIPES)
    try:
        from recipe_utils import check_ckpt_step
    finally:
        sys.path.remove(RECIPES)
    check_ckpt_step("/tmp/ck", 3, start=0, steps=4)  # saved once 3 of the 4 steps are done
    check_ckpt_step(None, None, start=0, steps=4)
    with pytest.raises(SystemExit, match="--ckpt-step needs --ckpt"):
        check_ckpt_step(None, 3, start=0, steps=4)
    for step in (0, 5):
        with pytest.raises(SystemExit, match=f"--ckpt-step {step} is not reached by this run: it trains from 0 to 4"):
            check_ckpt_step("/tmp/ck", step, start=0, steps=4)
    with pytest.raises(SystemExit, match="from 4 to 6"):  # a resumed run counts from its checkpoint's step
        check_ckpt_step("/tmp/ck", 4, start=4, steps=2)
