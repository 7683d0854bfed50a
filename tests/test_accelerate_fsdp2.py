"""accelerate's FSDP2 under Hugging Face's Trainer, as a fine-tuning script runs it (``fsdp="full_shard"``,
``fsdp_config={"fsdp_version": 2}``), on 2 CPU ranks over gloo: accelerate builds the optimizer on the
unsharded parameters and swaps the sharded ones in afterwards."""
import json
import os

import pytest

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from test_distributed import torchrun  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def trainer_fsdp2(tmp_path, *args):
    """recipes/hf_trainer_finetune.py --fsdp2 on 2 ranks: (its JSON report, stdout + stderr)."""
    report = tmp_path / f"report_{len(list(tmp_path.glob('report_*')))}.json"
    out = torchrun(2, os.path.join(ROOT, "tests", "accelerate_fsdp_cpu.py"), os.path.join(ROOT, "recipes", "hf_trainer_finetune.py"),
                   "--fsdp2", "--output-dir", str(tmp_path / "out"), "--report-out", str(report), *args)
    return json.loads(report.read_text()), out.stdout + out.stderr


def test_trainer_fsdp2_keeps_the_embedding_rule_tracks_torch_and_resumes_exactly(tmp_path):
    # block_size=128: every matrix of the tiny Llama (width 128) has rows of whole blocks, so each could be 8-bit
    ours, said = trainer_fsdp2(tmp_path, "--route", "install", "--optim", "adamw_8bit", "--optim-args", "block_size=128",
                               "--steps", "6", "--save-steps", "3")
    assert ours["optimizer"] == "lowbit_adamw.optimizer.AdamW8bit"
    # Trainer's embedding rule survives the swap to sharded parameters; the norms are under min_8bit_size
    fp32 = ours["fp32_state_params"]
    assert fp32[0] == "model.embed_tokens.weight" and all("norm" in n for n in fp32[1:]) and len(fp32) == 6, fp32
    assert [k for k, _ in ours["state_kinds"]].count("8bit") == 15, ours["state_kinds"]
    assert "no longer among" not in said and "sharded tensor(s)" not in said
    assert "full-precision state for 1 tensor(s) by fp32_state, 5 tensor(s) by min_8bit_size" in said
    base, _ = trainer_fsdp2(tmp_path, "--route", "plain", "--optim", "adamw_torch", "--steps", "6")
    assert base["optimizer"] == "torch.optim.adamw.AdamW"
    for step, loss in base["losses"].items():
        assert abs(ours["losses"][step] - loss) <= 0.02 * loss, (ours["losses"], base["losses"])
    resumed, _ = trainer_fsdp2(tmp_path, "--route", "install", "--optim", "adamw_8bit", "--optim-args", "block_size=128",
                               "--steps", "6", "--resume", str(tmp_path / "out" / "checkpoint-3"))
    assert resumed["losses"] == {k: v for k, v in ours["losses"].items() if int(k) > 3}, (resumed["losses"], ours["losses"])
    assert resumed["state_kinds"] == ours["state_kinds"] and resumed["fp32_state_params"] == fp32


def test_trainer_fsdp2_says_which_shards_keep_fp32_state_and_the_block_size_that_fits(tmp_path):
    # the default block of 256 is longer than the rows (128) of every matrix but the MLP's down projections
    ours, said = trainer_fsdp2(tmp_path, "--route", "install", "--optim", "adamw_8bit", "--steps", "2")
    kinds = [k for k, _ in ours["state_kinds"]]
    assert kinds.count("8bit") == 2, ours["state_kinds"]
    # q, k, v, o, gate, up of both layers and lm_head: 13 tensors, 131,072 elements per rank of 8 B instead of ~2
    assert "13 sharded tensor(s) (131,072 elements on this rank) keep fp32 state" in said, said[-3000:]
    assert "block_size=128 would give 13 of them 8-bit state" in said
    assert "full-precision state for 1 tensor(s) by fp32_state, 5 tensor(s) by min_8bit_size, 13 tensor(s) by shard_rows" in said
