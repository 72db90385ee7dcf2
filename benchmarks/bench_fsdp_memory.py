"""FSDP2 on CPU: a 1.1B Llama (TinyLlama-1.1B's shape, random weights) with LoRA on every linear module, sharded
over the processes of `torchrun --nproc_per_node N` (gloo), a few training steps with the gradient measures of
lorasens.analysis.sharding at every step. Prints wall time per step and each rank's peak resident memory.

    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 benchmarks/bench_fsdp_memory.py [--steps 3]

The model is built on the meta device and materialised after sharding, so no process ever holds all weights."""

import argparse
import resource
import time

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from transformers import LlamaConfig, LlamaForCausalLM

from lorasens.analysis.sharding import sharded_importance, sharded_norms
from lorasens.model.lora import apply_lora, lora_parameters, targets_for
from lorasens.model.module_map import build_module_map

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=3)
parser.add_argument("--tokens", type=int, default=128)
args = parser.parse_args()
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
config = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                     num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
                     tie_word_embeddings=False)
with torch.device("meta"):
    model = LlamaForCausalLM(config)
module_map = build_module_map(model, None, None)
peft = apply_lora(model, targets_for(module_map, "both"), 8, 16.0, 0.0)
for layer in peft.base_model.model.model.layers:
    fully_shard(layer)
fully_shard(peft)
peft.to_empty(device="cpu")
torch.manual_seed(rank)
with torch.no_grad():
    for name, p in peft.named_parameters():
        local = p.to_local()
        local.normal_(0, 0.02) if "lora_B" not in name else local.normal_(0, 1e-3)
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    rotary = LlamaRotaryEmbedding(config)  # the rotary inverse frequencies, built on the CPU
    for buf_name, buf in peft.named_buffers():
        buf.copy_(dict(rotary.named_buffers())[buf_name.rpartition(".")[2]])
lora = lora_parameters(peft, module_map)
params = [p for lp in lora for p in (lp.A, lp.B)]
n_total = sum(p.numel() for p in peft.parameters())
optimizer = torch.optim.AdamW(params, lr=1e-4)
ids = torch.randint(0, 32000, (1, args.tokens), generator=torch.Generator().manual_seed(rank))
times = []
for step in range(args.steps):
    start = time.perf_counter()
    loss = peft(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for p in params]
    norms = sharded_norms(grads)
    importance = sharded_importance(params, grads)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    times.append(time.perf_counter() - start)
    if rank == 0:
        print(f"step {step + 1}: loss {loss.item():.4f}, {len(norms)} LoRA gradient norms (total "
              f"{norms.double().square().sum().sqrt().item():.4g}), {time.perf_counter() - start:.1f} s", flush=True)
peak = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20])  # GiB (ru_maxrss is KiB)
gathered = [torch.zeros(1) for _ in range(world)]
dist.all_gather(gathered, peak)
if rank == 0:
    print(f"{n_total / 1e9:.2f}B parameters, {world} processes: {sum(times[1:]) / max(1, len(times) - 1):.1f} s per "
          f"step after the first ({args.tokens} tokens per rank); peak resident memory per rank "
          f"{', '.join(f'{g.item():.2f}' for g in gathered)} GiB", flush=True)
dist.destroy_process_group()
