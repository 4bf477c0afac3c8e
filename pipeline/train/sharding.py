"""How the model is spread over the ranks (``scaling.strategy``).

- ``ddp``: every rank holds the whole model, its gradients and AdamW state; gradients are all-reduced on a
  step's last micro-batch (Ray Train's ``prepare_model``). Right while a model and its optimizer state fit
  on one device: ViT-B and ViT-L.
- ``fsdp``: FSDP2 (``torch.distributed.fsdp.fully_shard``), as torchtitan and VideoMAE V2's giant use it:
  each transformer block, and the rest of the model as one more unit, keeps 1/world of its parameters,
  gradients and optimizer state per rank; a block's parameters are gathered for its forward and again for
  its backward, and its gradients reduce-scattered. Memory per rank falls with the world size at the cost
  of those collectives. Under bf16 the gathered parameters are bf16 (``MixedPrecisionPolicy``) and the
  gradient reduction stays float32. Checkpoints hold the shards through torch.distributed.checkpoint
  (pipeline/train/checkpointing.py), so a group of another size resumes them.

The probe, the reconstruction pictures and validation run the model outside the training step, on each
rank's own share of their data or on rank 0 alone: under FSDP those passes would wait on collectives the
other ranks never join. ``Placement.replica()`` gives them a whole, unsharded copy instead (gathered on
every rank at the same step); under DDP it is the model itself.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Literal

import torch
from torch import nn

from pipeline.config import ConfigError
from pipeline.models.videomae.modeling import VideoMAELayer

Strategy = Literal["ddp", "fsdp"]


def check_strategy(strategy: str, precision: str) -> None:
    """Refuse what FSDP does not do here, before any worker starts: fp16 needs a gradient scaler that
    knows the gradients are sharded."""
    if strategy == "fsdp" and precision == "fp16":
        raise ConfigError("scaling.strategy=fsdp trains in fp32 or bf16 (train.precision), not fp16")


def blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks, the units FSDP shards one by one (encoder and decoder layers)."""
    return [m for m in model.modules() if isinstance(m, VideoMAELayer)]


def unwrap(model: nn.Module) -> nn.Module:
    """The model itself, without its DDP wrapper or torch.compile's (whose state_dict keys gain a prefix);
    FSDP shards a module in place, so a sharded model is its own."""
    model = model.module if hasattr(model, "module") else model
    return getattr(model, "_orig_mod", model)


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(unwrap(model), FSDPModule)


def plain_tensor(value: torch.Tensor) -> torch.Tensor:
    """A DTensor (FSDP's gradient norms) as an ordinary tensor; anything else unchanged."""
    from torch.distributed.tensor import DTensor

    return value.full_tensor() if isinstance(value, DTensor) else value


def full_state_dict(model: nn.Module, *, rank0_only: bool) -> dict[str, torch.Tensor]:
    """The whole model's state dict gathered from its shards (a collective: every rank calls it). With
    ``rank0_only`` it lands on rank 0's CPU and the others get ``{}`` (a checkpoint's export)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=rank0_only)
    return get_model_state_dict(unwrap(model), options=options)


class Placement:
    """The model as trained (``model``: DDP-wrapped, or sharded in place) beside the model itself
    (``module``: what checkpoints, probes and pictures name), and what differs between the strategies."""

    def __init__(self, module: nn.Module, strategy: Strategy, device: torch.device,
                 param_dtype: torch.dtype | None, compile_with: str | None,
                 build_replica: Callable[[], nn.Module]) -> None:
        self.module, self.strategy, self.device = module, strategy, device
        self._build_replica, self._replica = build_replica, None
        self._replica_step: int | None = None
        if strategy == "fsdp":
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            module.to(device)
            policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
            for block in blocks(module):
                fully_shard(block, mp_policy=policy)
            fully_shard(module, mp_policy=policy)
            self.model = torch.compile(module, backend=compile_with) if compile_with else module
        else:
            import ray.train.torch

            compiled = torch.compile(module, backend=compile_with) if compile_with else module
            self.model = ray.train.torch.prepare_model(compiled)  # moves the module (in place), wraps it

    @property
    def sharded(self) -> bool:
        return self.strategy == "fsdp"

    @contextlib.contextmanager
    def gradient_sync(self, sync: bool) -> Iterator[None]:
        """A micro-batch's backward with (``sync``) or without the gradient reduction: accumulate locally
        until a step's last micro-batch."""
        if self.sharded:
            self.module.set_requires_gradient_sync(sync)
            yield
        elif sync or not hasattr(self.model, "no_sync"):
            yield
        else:
            with self.model.no_sync():
                yield

    def replica(self, step: int) -> nn.Module:
        """A whole copy of the model as of ``step`` for passes outside the training step (see the module
        docstring); under FSDP every rank must call it at the same step."""
        if not self.sharded:
            return self.module
        if self._replica_step != step:
            state = full_state_dict(self.model, rank0_only=False)
            if self._replica is None:
                self._replica = self._build_replica().to(self.device)
            self._replica.load_state_dict(state)
            self._replica_step = step
        self._replica.train(self.module.training)
        return self._replica
