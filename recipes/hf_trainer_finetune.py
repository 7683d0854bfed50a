"""Fine-tune a tiny Llama with Hugging Face Trainer and lowbit-adamw (offline, CPU or GPU).

    python recipes/hf_trainer_finetune.py                    # 40 steps, prints loss and memory
    python recipes/hf_trainer_finetune.py --route install    # same, via optim="adamw_8bit" + install()

Routes:
  cls_kwargs  Trainer(optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(args, model))  (the explicit one)
  install     lowbit_adamw.integrations.transformers.install(); TrainingArguments(optim="adamw_8bit")
  plain       TrainingArguments(optim="adamw_8bit") and nothing else: bitsandbytes, unless this script is
              run as `python -m lowbit_adamw.integrations.transformers recipes/hf_trainer_finetune.py --route plain`
"""
from __future__ import annotations

import argparse
import json

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from recipe_utils import byte_windows, memory_summary, tiny_llama


class LossLog(TrainerCallback):
    def __init__(self):
        self.losses = {}

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses[state.global_step] = logs["loss"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--route", choices=("cls_kwargs", "install", "plain"), default="cls_kwargs")
    ap.add_argument("--output-dir", default="/tmp/lowbit_hf_trainer")
    ap.add_argument("--save-steps", type=int, default=0, help="save a checkpoint every N steps (0: never)")
    ap.add_argument("--resume", default=None, help="checkpoint folder to resume from")
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--bf16", action="store_true", help="bf16 mixed precision (autocast)")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--optim", default="adamw_8bit", help="TrainingArguments.optim for the install and plain routes")
    ap.add_argument("--report-out", default=None, help="write losses and optimizer facts as JSON here")
    ap.add_argument("--deepspeed-stage", type=int, choices=(1, 2, 3), default=None,
                    help="train under DeepSpeed ZeRO at this stage (launch with torchrun; DS_ACCELERATOR=cpu on a CPU)")
    ap.add_argument("--optim-args", default=None, help='TrainingArguments.optim_args, e.g. "block_size=128"')
    ap.add_argument("--fsdp2", action="store_true",
                    help="shard with accelerate's FSDP2 (fully_shard per decoder layer; launch with torchrun)")
    args = ap.parse_args(argv)

    model = tiny_llama(seed=0)
    train = byte_windows(64 * args.grad_accum * 4)
    targs = TrainingArguments(
        output_dir=args.output_dir, max_steps=args.steps, per_device_train_batch_size=4,
        gradient_accumulation_steps=args.grad_accum, learning_rate=args.lr, weight_decay=0.1,
        lr_scheduler_type="cosine", warmup_steps=max(1, args.steps // 10), max_grad_norm=1.0,
        logging_steps=1, save_strategy="steps" if args.save_steps else "no", save_steps=args.save_steps or 500,
        report_to="none", use_cpu=not torch.cuda.is_available(), bf16=args.bf16, seed=0,
        dataloader_num_workers=0, disable_tqdm=True,
        optim="adamw_torch" if args.route == "cls_kwargs" else args.optim, optim_args=args.optim_args,
        # The Trainer fills in the "auto" values and sets zero_allow_untested_optimizer itself.
        deepspeed=None if args.deepspeed_stage is None else {
            "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
            "zero_optimization": {"stage": args.deepspeed_stage}},
        fsdp="full_shard" if args.fsdp2 else "",
        fsdp_config={"fsdp_version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]} if args.fsdp2 else None,
    )
    extra = {}
    if args.route == "cls_kwargs":
        from lowbit_adamw.integrations.transformers import optimizer_cls_and_kwargs

        extra["optimizer_cls_and_kwargs"] = optimizer_cls_and_kwargs(targs, model)
    elif args.route == "install":
        from lowbit_adamw.integrations.transformers import install

        install()
    log = LossLog()
    trainer = Trainer(model=model, args=targs, train_dataset=train, callbacks=[log], **extra)
    trainer.train(resume_from_checkpoint=args.resume)
    opt = trainer.optimizer
    inner = getattr(opt, "optimizer", opt)  # accelerate wraps it
    inner = getattr(inner, "optimizer", inner)  # and DeepSpeed's ZeRO optimizer wraps the client optimizer
    first, last = min(log.losses), max(log.losses)
    print(f"optimizer: {type(inner).__module__}.{type(inner).__name__}")
    print(f"loss: step {first} {log.losses[first]:.4f} -> step {last} {log.losses[last]:.4f}")
    print(f"memory: {memory_summary(inner)}")
    if args.fsdp2 and not any(hasattr(p, "placements") for g in inner.param_groups for p in g["params"]):
        print("note: accelerate ran DDP, not FSDP2 (it drops the FSDP plugin on a machine without GPUs)")
    if args.report_out:
        fp32 = [n for n, p in model.named_parameters() if "exp_avg" in inner.state.get(p, {})]
        with open(args.report_out, "w") as f:
            json.dump({"optimizer": f"{type(inner).__module__}.{type(inner).__name__}",
                       "losses": {str(k): v for k, v in sorted(log.losses.items())},
                       "fp32_state_params": fp32,
                       "group_weight_decay": [g["weight_decay"] for g in inner.param_groups],
                       "group_bits": [g.get("bits") for g in inner.param_groups],
                       # per state entry (a parameter, or under ZeRO a rank's flat partition of a param group)
                       "state_kinds": [["8bit", st["exp_avg_codes"].numel()] if "exp_avg_codes" in st else
                                       ["fp32", st["exp_avg"].numel()] if "exp_avg" in st else ["other", None]
                                       for st in inner.state.values() if "step" in st],
                       "steps": {n: float(inner.state[p]["step"]) for n, p in model.named_parameters() if p in inner.state}},
                      f, indent=1)


if __name__ == "__main__":
    main()
