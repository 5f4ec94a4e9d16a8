"""What blocks FSDP2 on a CPU: torch shards, accelerate does not. Run it under the FSDP launcher config:

    # as the recipes run on a CPU (they set use_cpu, i.e. ACCELERATE_USE_CPU): MULTI_CPU, plain DDP, no FSDP plugin
    ACCELERATE_USE_CPU=true accelerate launch --config_file accelerate_configs/fsdp2.yaml --num_processes 2 \
        scripts/fsdp2_on_cpu.py
    # without it: distributed_type NO, two independent processes
    accelerate launch --config_file accelerate_configs/fsdp2.yaml --num_processes 2 scripts/fsdp2_on_cpu.py

Each rank prints what accelerate made of the launch (its distributed type, whether it built the FSDP plugin, what
`prepare` returned) and then what torch's own `fully_shard` does on the same processes over gloo (each rank holds
half of each weight, and the losses agree across ranks)."""

import os

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate import __version__ as accelerate_version
from torch.distributed.fsdp import fully_shard


def two_layers() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))


accelerator = Accelerator()
rank = int(os.environ.get("RANK", 0))
prepared = accelerator.prepare(two_layers())
print(f"rank {rank}: accelerate {accelerate_version}: distributed_type={accelerator.distributed_type.value}, "
      f"FSDP plugin built: {getattr(accelerator.state, 'fsdp_plugin', None) is not None}, prepare() returned "
      f"{type(prepared).__name__} with {type(next(prepared.parameters())).__name__} weights", flush=True)

if not dist.is_initialized():
    dist.init_process_group("gloo")
model = two_layers()
for layer in model:
    fully_shard(layer)
fully_shard(model)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
batch = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
for _ in range(3):
    loss = model(batch).pow(2).mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
weight = model[0].weight
print(f"rank {rank}: torch {torch.__version__} fully_shard on CPU (gloo): {type(weight).__name__} {tuple(weight.shape)}, "
      f"this rank holds {tuple(weight.to_local().shape)}; loss after 3 steps {loss.item():.6f}", flush=True)
dist.destroy_process_group()
