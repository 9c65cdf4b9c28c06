"""Data parallelism applied from outside the model: DDP or FSDP2, on the process group Ray Train set up.

The UNet code knows nothing of distribution. FSDP shards each down/mid/up block and then the root
(``torch.distributed.fsdp.fully_shard``), so parameters, gradients and optimizer states are split
across ranks. Checkpoints are always full, unsharded state dicts (gathered collectively and
written by rank 0), so a checkpoint loads the same way whatever the world size or strategy.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch.nn.parallel import DistributedDataParallel

from components.config import Parallel


class Strategy:
    def __init__(self, kind: Parallel, world: int):
        self.kind = kind if world > 1 else None
        self.world = world

    @property
    def sharded(self) -> bool:
        return self.kind is Parallel.FSDP

    def wrap(self, unet: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        """Returns the module the step calls; ``unet`` (already on ``device``) stays the parameter owner.
        The process group is the one Ray Train set up for the worker group."""
        if self.kind is Parallel.DDP:
            return DistributedDataParallel(unet, device_ids=[device.index] if device.type == "cuda" else None)
        if self.kind is Parallel.FSDP:
            from torch.distributed.fsdp import fully_shard  # FSDP's modules load only for the fsdp strategy

            for block in [*unet.down_blocks, unet.mid_block, *unet.up_blocks]:
                if block is not None:
                    fully_shard(block)
            fully_shard(unet)
        return unet

    def accumulating(self, model: torch.nn.Module, sync: bool):
        """Skip the gradient all-reduce on micro-batches that do not end an accumulation."""
        if self.kind is Parallel.DDP and not sync:
            return model.no_sync()
        if self.kind is Parallel.FSDP:
            model.set_requires_gradient_sync(sync)
        return nullcontext()

    def model_state(self, unet: torch.nn.Module) -> dict[str, torch.Tensor]:
        """Full state dict on CPU. Collective under FSDP: every rank must call it."""
        if not self.sharded:
            return {k: v.detach().cpu() for k, v in unet.state_dict().items()}
        # loads FSDP's modules: sharded runs only
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(unet, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def optimizer_state(self, unet: torch.nn.Module, optimizer) -> dict:
        if not self.sharded:
            return optimizer.state_dict()
        # loads FSDP's modules: sharded runs only
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(unet, optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_model_state(self, unet: torch.nn.Module, state: dict) -> None:
        if not self.sharded:
            unet.load_state_dict(state, strict=True)
            return
        # loads FSDP's modules: sharded runs only
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(unet, state, options=StateDictOptions(full_state_dict=True, strict=True))

    def load_optimizer_state(self, unet: torch.nn.Module, optimizer, state: dict) -> None:
        if not self.sharded:
            optimizer.load_state_dict(state)
            return
        # loads FSDP's modules: sharded runs only
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(unet, optimizer, state, options=StateDictOptions(full_state_dict=True))
