"""DeepSpeed ZeRO with AdamW8bit as the client optimizer, on 2 CPU ranks (DS_ACCELERATOR=cpu; gloo): what a
fine-tuning script that outgrows one GPU runs (docs/integrations.md, recipes/deepspeed_zero.py)."""
import json
import os

import pytest

pytest.importorskip("deepspeed", reason="the test extra installs deepspeed")


import ds_workers as W  # noqa: E402
from test_distributed import spawn, torchrun, torchrun_recipe  # noqa: E402


@pytest.fixture(scope="module")
def zero_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("deepspeed")
    old = os.environ.get("DS_ACCELERATOR")
    os.environ["DS_ACCELERATOR"] = "cpu"
    try:
        spawn(W.zero_stages, 2, str(tmp / "out.json"), str(tmp / "ckpt"))  # repeats a run gloo aborts at exit
    finally:
        if old is None:
            del os.environ["DS_ACCELERATOR"]
        else:
            os.environ["DS_ACCELERATOR"] = old
    return {int(k): v for k, v in json.loads((tmp / "out.json").read_text()).items()}


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_trains_like_torch_adamw_with_8bit_state_on_the_partition(zero_runs, stage):
    row = zero_runs[stage]
    # the same engine, batches and init: the 8-bit moments follow fp32 AdamW's loss closely over 4 steps
    for a, b in zip(row["torch"], row["lowbit"]):
        assert abs(a - b) <= 2e-3 * a, (row["torch"], row["lowbit"])
    # ZeRO hands the optimizer each rank's flat partition, not the model's parameters: its codes cover half of
    # the model's 133,824 elements on rank 0 (ZeRO-3 takes the partition out of the param group between steps)
    assert sum(n for k, _, n in row["state"] if k == "exp_avg_codes") == 133_824 // 2
    keys = {k for k, _, _ in row["state"]}
    assert {"exp_avg_codes", "exp_avg_sq_codes", "exp_avg_absmax", "exp_avg_sq_absmax"} <= keys
    assert all(dtype == "torch.uint8" for k, dtype, _ in row["state"] if k.endswith("_codes"))
    assert "exp_avg" not in keys  # no full-precision moments beside the codes


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_checkpoint_resumes_exactly(zero_runs, stage):
    row = zero_runs[stage]
    assert row["state_equal_after_resume"]
    assert row["resumed"] == row["continued"]


DS_CPU = os.path.join(os.path.dirname(os.path.abspath(__file__)), "deepspeed_cpu.py")  # no shm op to build


def test_the_shm_op_is_skipped_where_the_tests_ask(monkeypatch):
    # the module itself: `import deepspeed.comm.torch as m` would have stubbed PyTorch and built the op anyway
    import importlib

    from deepspeed_cpu import skip_shm_op

    backend = importlib.import_module("deepspeed.comm.torch")
    monkeypatch.setattr(backend, "build_shm_op", backend.build_shm_op)  # restored after the test
    skip_shm_op()
    assert backend.build_shm_op() is None


def _recipe(*args):
    return torchrun_recipe(2, *args, recipe="deepspeed_zero.py", wrapper=DS_CPU)


def test_the_recipe_with_zero_offload_resumes_exactly(tmp_path):
    # 4 steps with a checkpoint saved after step 2 (training goes on), then 2 steps resumed from it
    full, stdout = _recipe("--stage", "2", "--offload", "--steps", "4", "--ckpt", str(tmp_path / "ck"), "--ckpt-step", "2")
    assert "(2.03 B/param)" in stdout  # 8-bit state on the rank's partition, in host memory
    assert "after step 2" in stdout and sorted(full) == [0, 1, 2, 3]
    resumed, stdout = _recipe("--stage", "2", "--offload", "--steps", "2", "--resume", str(tmp_path / "ck"))
    assert "resumed from" in stdout and "at step 2" in stdout and resumed == {2: full[2], 3: full[3]}


def _trainer_run(tmp_path, stage, *args):
    """recipes/hf_trainer_finetune.py under a ZeRO ``stage`` config on 2 CPU ranks: (its JSON report, stdout, stderr)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    report = tmp_path / f"report_{len(list(tmp_path.iterdir()))}.json"
    out = torchrun(2, DS_CPU, os.path.join(root, "recipes", "hf_trainer_finetune.py"), "--deepspeed-stage", str(stage), "--steps", "6",
                   "--output-dir", str(tmp_path / "out"), "--report-out", str(report), *args, DS_ACCELERATOR="cpu")
    return json.loads(report.read_text()), out.stdout, out.stderr


def test_trainer_with_a_zero2_config_builds_adamw8bit_tracks_torch_adamw_and_resumes_exactly(tmp_path):
    pytest.importorskip("transformers")
    # the Trainer string, routed to AdamW8bit by install()
    ours, _, said = _trainer_run(tmp_path, 2, "--route", "install", "--optim", "adamw_8bit", "--save-steps", "3")
    base, _, _ = _trainer_run(tmp_path, 2, "--route", "plain", "--optim", "adamw_torch")
    assert ours["optimizer"] == "lowbit_adamw.optimizer.AdamW8bit"
    assert base["optimizer"] == "torch.optim.adamw.AdamW"
    # the Trainer's two param groups (with and without weight decay) give each rank two flat partitions: the
    # matrices' one has 8-bit state; the biases' and norms' one is under min_8bit_size and keeps fp32 state
    kinds = sorted(ours["state_kinds"], key=lambda kind: kind[1])
    assert [k for k, _ in kinds] == ["fp32", "8bit"] and kinds[0][1] < 4096 < kinds[1][1], kinds
    for step, loss in base["losses"].items():
        assert abs(ours["losses"][step] - loss) <= 0.02 * loss, (ours["losses"], base["losses"])
    # the embedding rule cannot follow the weights into ZeRO's flat partitions: the first step says so, per rank
    assert said.count("1 parameter(s) chosen for fp32 state (32,768 elements) are no longer among") == 2, said[-3000:]
    resumed, _, _ = _trainer_run(tmp_path, 2, "--route", "install", "--optim", "adamw_8bit", "--resume", str(tmp_path / "out" / "checkpoint-3"))
    assert resumed["losses"] == {k: v for k, v in ours["losses"].items() if int(k) > 3}, (resumed["losses"], ours["losses"])
    assert resumed["state_kinds"] == ours["state_kinds"]


def test_trainer_with_a_zero3_config_saves_and_resumes_exactly_and_counts_its_partitions(tmp_path):
    # ZeRO-3 partitions the parameters themselves (each is empty on every rank between forward passes) and puts a
    # rank's flat partition into the optimizer's group only while it steps; the memory line and the lost-choice
    # notice must still count the partitions and the parameters (lowbit_adamw.memory.state.optimizer_params)
    pytest.importorskip("transformers")
    ours, stdout, said = _trainer_run(tmp_path, 3, "--route", "install", "--optim", "adamw_8bit", "--save-steps", "3")
    assert ours["optimizer"] == "lowbit_adamw.optimizer.AdamW8bit"
    kinds = sorted(ours["state_kinds"], key=lambda kind: kind[1])
    assert [k for k, _ in kinds] == ["fp32", "8bit"] and kinds[0][1] < 4096 < kinds[1][1], kinds
    losses = [ours["losses"][str(k)] for k in range(1, 7)]
    assert losses[-1] < 0.85 * losses[0], losses
    memory = [line for line in stdout.splitlines() if line.startswith("memory:")]
    assert len(memory) == 2, stdout[-2000:]
    for line in memory:  # this rank's partitions: ~2 B/param, and the small group's partition by its cause
        per_param = float(line.split(" B/param")[0].split("(")[-1])
        assert 2.0 < per_param < 2.2 and f"over {kinds[0][1] + kinds[1][1]:,} params" in line, line
        assert "full-precision state for 1 tensor(s) by min_8bit_size" in line, line
    assert said.count("1 parameter(s) chosen for fp32 state (32,768 elements) are no longer among") == 2, said[-3000:]
    resumed, _, _ = _trainer_run(tmp_path, 3, "--route", "install", "--optim", "adamw_8bit", "--resume", str(tmp_path / "out" / "checkpoint-3"))
    assert resumed["losses"] == {k: v for k, v in ours["losses"].items() if int(k) > 3}, (resumed["losses"], ours["losses"])
    assert resumed["state_kinds"] == ours["state_kinds"]
