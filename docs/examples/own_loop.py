"""Watch the wrong-dip of a LoRA fine-tune written as a plain PyTorch loop (no Lightning Trainer, no HF Trainer)."""

import torch
from peft import LoraConfig, get_peft_model
from torch.utils.tensorboard import SummaryWriter

import dipreg
from dipreg.callbacks import DipTracker


def main(model, tokenizer, batches, pairs="core", out="runs/own_loop", every_n_steps=15):
    """Fine-tune ``model`` with LoRA on ``batches`` (token-id tensors), probing the dip every ``every_n_steps``."""
    model = get_peft_model(model, LoraConfig(r=16, target_modules=["q_proj", "v_proj"]))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    tracker = DipTracker(
        pairs,
        tokenizer=tokenizer,
        lenses=("logit", "causal"),
        every_n_steps=every_n_steps,
        sinks=SummaryWriter(out),  # or a Lightning/Fabric logger, or fn(scalars, step)
    )
    model.train()
    step = 0
    for step, batch in enumerate(batches):
        if tracker.due(step):  # step 0, then every `every_n_steps` optimizer steps
            reading = tracker.probe(model, step)
            print(f"step {step}: causal dip {reading.scalars.get('dip/causal/max_wrong_dip', float('nan')):.3f}")
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        # a checkpoint would hold tracker.state_dict() next to the weights; tracker.load_state_dict() resumes it
    tracker.finish(model, step + 1, history_file=f"{out}/dip_history.json")  # final weights, every lens
    return tracker


if __name__ == "__main__":
    model, tokenizer = dipreg.load_model()  # the default model; any HF causal LM and its tokenizer work
    text = ["Ice is cold. Fire is hot. Snow is white. Coal is black."] * 4
    batch = tokenizer(text, return_tensors="pt").input_ids
    main(model, tokenizer, [batch] * 30)
