"""FSDP2 worker for tests/test_fsdp.py: `fully_shard` on the tiny Llama with LoRA, under torchrun (gloo, CPU) or as
one plain process (no process group). Writes OUT/rank{R}.pt: per-step gradient norms and importance from
lorasens.analysis.sharding, ||delta W|| from the gathered factors, and the LoRA weights after each optimizer step.

Step 1 trains every module; steps 2-3 freeze the MLP modules through lora.set_trainable (a phase switch)."""

import json
import os
import sys

import torch
import torch.distributed as dist

from lorasens.analysis.measures import update_magnitudes
from lorasens.model.lora import LoraParams, apply_lora, lora_parameters, set_trainable, targets_for
from lorasens.model.loading import build_tiny_random_llama
from lorasens.model.module_map import build_module_map
from lorasens.analysis.sharding import full, sharded_importance, sharded_norms

out = sys.argv[1]
world = int(os.environ.get("WORLD_SIZE", "1"))
rank = int(os.environ.get("RANK", "0"))
if world > 1:
    dist.init_process_group("gloo")
torch.manual_seed(0)
model = build_tiny_random_llama().model
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
ids = torch.randint(0, 200, (4, 24), generator=torch.Generator().manual_seed(1))
per_rank = 4 // world
record = {"norms": [], "importance": [], "delta_w": [], "weights": [], "grad_is_none": []}
for step in range(3):
    if step == 1:
        set_trainable(peft, lora, [m for m in module_map.modules if m.group == "attn"])
    batch = ids[rank * per_rank:(rank + 1) * per_rank]
    loss = peft(input_ids=batch, labels=batch).loss
    loss.backward()  # FSDP averages the ranks' gradients: the mean over the global batch, as in one process
    params = [p for lp in lora for p in (lp.A, lp.B) if p.grad is not None]
    grads = [p.grad for p in params]
    record["grad_is_none"].append([p.grad is None for lp in lora for p in (lp.A, lp.B)])
    record["norms"].append(sharded_norms(grads))
    record["importance"].append(sharded_importance(params, grads))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    gathered = [LoraParams(lp.module, full(lp.A.detach()), full(lp.B.detach()), lp.scaling) for lp in lora]
    record["delta_w"].append(update_magnitudes(gathered))
    record["weights"].append([t.clone() for lp in gathered for t in (lp.A, lp.B)])
torch.save(record, os.path.join(out, f"rank{rank}.pt"))
if world > 1:
    dist.destroy_process_group()
