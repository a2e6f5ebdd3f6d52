"""A plain accelerate training loop over ia3's library API, for checking DDP / FSDP / DeepSpeed launches.

`ia3 train` runs on one process, DDP or FSDP; this loop is what a user's own script under FSDP or DeepSpeed looks like:
prepare, train the (IA)^3 vectors (and the classifier head), then save the adapter from a gathered state dict
(`accelerator.get_state_dict`, a collective every process calls) so that sharded parameters are saved whole.

    accelerate launch --config_file configs/accelerate/<config>.yaml --num_processes N \
        scripts/gpu_check_loop.py --model DIR --out DIR [--steps 8 --batch-size 16]

Prints one JSON line (loss per step, world size, distributed type) from the main process. Used by gpu_check.sh;
also runs on CPU (one process, or several with ddp.yaml, where ia3 picks gloo like `ia3 train` does).
"""

from __future__ import annotations

import argparse
import json
import os

import torch


def _frozen(model) -> set[str]:
    """Names of the frozen parameters, without the modules FSDP inserts."""
    from ia3.peft_model import WRAPPER_MODULES

    return {
        ".".join(p for p in name.split(".") if p not in WRAPPER_MODULES)
        for name, param in model.named_parameters()
        if not param.requires_grad
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--model", required=True, help="a (tiny) BERT-like model folder, trained as a 3-class classifier"
    )
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=16, help="global batch, split over the processes")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from accelerate import Accelerator
    from torch.utils.data import DataLoader, TensorDataset
    from transformers import AutoModelForSequenceClassification

    import ia3

    no_device = not torch.cuda.is_available()
    accelerator = Accelerator(cpu=no_device and int(os.environ.get("WORLD_SIZE", "1")) > 1)
    world = accelerator.num_processes
    if args.batch_size % world:
        raise SystemExit(f"--batch-size {args.batch_size} must be divisible by the {world} processes")

    torch.manual_seed(args.seed)  # the same head initialisation and data on every process and in every launch
    base = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=3)
    model = ia3.get_peft_model(base, ia3.IA3Config(task_type="SEQ_CLS"))
    frozen = _frozen(model)
    vocab = base.config.vocab_size
    g = torch.Generator().manual_seed(args.seed)
    n = args.steps * args.batch_size
    data = TensorDataset(
        torch.randint(5, vocab, (n, 24), generator=g),
        torch.ones(n, 24, dtype=torch.long),
        torch.randint(0, 3, (n,), generator=g),
    )
    loader = DataLoader(data, batch_size=args.batch_size // world, shuffle=False)

    # one prepare call for all three: under FSDP2 accelerate re-points the optimizer at the sharded parameters
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)

    model.train()
    losses = []
    for input_ids, attention_mask, labels in loader:
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(accelerator.reduce(loss.detach(), reduction="mean")))

    state = accelerator.get_state_dict(model)  # gathers sharded parameters: every process must call it
    peft_model = accelerator.unwrap_model(model)
    still_frozen = _frozen(peft_model)
    if accelerator.is_main_process:
        peft_model.save_pretrained(args.out, state_dict=state)
        print(
            json.dumps(
                {
                    "world": world,
                    "distributed_type": str(accelerator.distributed_type),
                    "losses": losses,
                    "frozen_params_unchanged": frozen == still_frozen,
                }
            )
        )
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main()
