"""FSDP2 worker for tests/test_fsdp.py: `fully_shard` on a tiny Llama with LoRA, under torchrun (gloo, CPU) or as
one plain process (no process group). `python fsdp_worker.py OUT [MODEL_DIR]`: the pretrained model in MODEL_DIR
(stories260K), else the tiny random Llama. Writes OUT/rank{R}.pt: per-step gradient norms and importance from
lorasens.analysis.sharding, ||delta W|| from the gathered factors, and the LoRA weights after each optimizer step;
and, on rank 0, OUT/run/: the CSVs of lorasens' GradientTrackingCallback (what SensitivityCallback runs), driven
through the Trainer's event sequence (on_train_begin; per step backward, accelerator.clip_grad_norm_, optimizer
step, on_step_end; on_train_end) with an accelerator that reports FSDP, as accelerate's FSDP2 plugin does on GPUs.

Step 1 trains every module; steps 2-3 freeze the MLP modules through lora.set_trainable (a phase switch)."""

import os
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
from accelerate.utils import DistributedType
from transformers import AutoModelForCausalLM, TrainerState

from lorasens.analysis.gradient_recorder import GradientTrackingCallback
from lorasens.analysis.measures import update_magnitudes
from lorasens.analysis.sharding import full, sharded_importance, sharded_norms
from lorasens.config import TrackingConfig
from lorasens.model.loading import build_tiny_random_llama
from lorasens.model.lora import LoraParams, apply_lora, lora_parameters, set_trainable, targets_for
from lorasens.model.module_map import build_module_map
from lorasens.training.trainer import RunState

out = sys.argv[1]
world = int(os.environ.get("WORLD_SIZE", "1"))
rank = int(os.environ.get("RANK", "0"))
if world > 1:
    dist.init_process_group("gloo")
torch.manual_seed(0)
model = (AutoModelForCausalLM.from_pretrained(sys.argv[2], dtype=torch.float32) if len(sys.argv) > 2
         else build_tiny_random_llama().model)
vocab = model.config.vocab_size
module_map = build_module_map(model, None, None)
peft = apply_lora(model, targets_for(module_map, "both"), 4, 8.0, 0.0)
for lp in lora_parameters(peft, module_map):
    torch.nn.init.normal_(lp.B, std=0.02)
if world > 1:
    from torch.distributed.fsdp import fully_shard

    for layer in peft.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(peft)
lora = lora_parameters(peft, module_map)  # after sharding: the DTensor parameters
optimizer = torch.optim.AdamW([p for lp in lora for p in (lp.A, lp.B)], lr=1e-2, weight_decay=0.1)
ids = torch.randint(0, min(vocab, 200), (4, 24), generator=torch.Generator().manual_seed(1))
per_rank = 4 // world

# The Trainer's side of the tracking callback: its state, and an accelerator whose clip_grad_norm_ the callback wraps
# (accelerate's FSDP2 path clips DTensor gradients with torch's clip_grad_norm_; at max_norm inf it scales by 1).
state = TrainerState()
state.is_world_process_zero = rank == 0
accelerator = SimpleNamespace(distributed_type=DistributedType.FSDP if world > 1 else DistributedType.NO,
                              clip_grad_norm_=lambda parameters, max_norm: torch.nn.utils.clip_grad_norm_(
                                  list(parameters), max_norm))
trainer = SimpleNamespace(accelerator=accelerator, model=peft, state=state)
run_state = RunState()
run_dir = Path(out) / "run"
run_dir.mkdir(exist_ok=True)
tracker = GradientTrackingCallback(run_dir, lora, run_state, TrackingConfig(), lambda: trainer)
tracker.on_train_begin(None, state, None)
record = {"norms": [], "importance": [], "delta_w": [], "weights": [], "grad_is_none": []}
for step in range(3):
    if step == 1:
        set_trainable(peft, lora, [m for m in module_map.modules if m.group == "attn"])
        run_state.phase = "attn_only"
    batch = ids[rank * per_rank:(rank + 1) * per_rank]
    loss = peft(input_ids=batch, labels=batch).loss
    loss.backward()  # FSDP averages the ranks' gradients: the mean over the global batch, as in one process
    params = [p for lp in lora for p in (lp.A, lp.B) if p.grad is not None]
    grads = [p.grad for p in params]
    record["grad_is_none"].append([p.grad is None for lp in lora for p in (lp.A, lp.B)])
    record["norms"].append(sharded_norms(grads))
    record["importance"].append(sharded_importance(params, grads))
    accelerator.clip_grad_norm_(peft.parameters(), float("inf"))  # the tracker measures here, as under the Trainer
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    state.global_step += 1
    tracker.on_step_end(None, state, None)
    gathered = [LoraParams(lp.module, full(lp.A.detach()), full(lp.B.detach()), lp.scaling) for lp in lora]
    record["delta_w"].append(update_magnitudes(gathered))
    record["weights"].append([t.clone() for lp in gathered for t in (lp.A, lp.B)])
tracker.on_train_end(None, state, None)
torch.save(record, os.path.join(out, f"rank{rank}.pt"))
if world > 1:
    dist.destroy_process_group()
