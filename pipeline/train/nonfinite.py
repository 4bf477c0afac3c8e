"""Steps whose loss or gradient is not finite: skipped, counted, rolled back, and bounded.

A NaN or inf loss (fp16 overflow, a diverging LR, a bad batch) must neither poison the weights nor end a
multi-day run at once. Per optimizer step, after the gradients are all-reduced:

- the step is **skipped** when the loss or the global gradient norm is not finite on any rank: no
  optimizer update (weights and Adam moments untouched), the LR schedule and data move on as for any
  step; under fp16 the GradScaler lowers its scale, and a finite loss with overflowing gradients is its
  ordinary calibration, not counted here;
- ``in_a_row`` skipped steps in a row **roll back** every rank to the last checkpoint (under fp16 with the
  loss scale halved once more per rollback);
- past ``rollbacks`` rollbacks the run **stops** with ``NonFiniteTraining``, naming the step and the
  videos of the last batch.

The check costs one host sync of a scalar per step (GradScaler makes the same one under fp16).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.distributed as dist


class NonFiniteTraining(RuntimeError):
    """Non-finite steps that rollbacks did not cure; the message names the step and the batch's videos."""


class NonFiniteGuard:
    """Counts skipped steps and says what the loop does next: ``step``, ``skip`` or ``rollback``."""

    def __init__(self, in_a_row: int, rollbacks: int):
        self.in_a_row_limit, self.rollback_limit = in_a_row, rollbacks
        self.total = 0  # skipped steps in this attempt
        self.in_a_row = 0
        self.rollbacks = 0

    @staticmethod
    def check(loss: torch.Tensor, grad_norm: torch.Tensor) -> tuple[bool, bool]:
        """(loss finite, gradient norm finite) on every rank: all ranks get the same answer. Under fp16 a
        finite loss with a non-finite gradient is GradScaler's overflow, which it handles itself."""
        bad = torch.stack([~torch.isfinite(loss.detach()), ~torch.isfinite(grad_norm.detach())]).float()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        loss_bad, grads_bad = bad.tolist()
        return not loss_bad, not grads_bad

    def stepped(self) -> None:
        self.in_a_row = 0

    def skipped(
        self, step: int, videos: list[str], batch: str = "the last batch"
    ) -> Literal["skip", "rollback"]:
        """Record a skipped ``step`` (1-based, the step it would have been); raises past the bound, naming
        ``videos``, the clips of ``batch`` (a description: which rank's batch, its loss)."""
        self.total += 1
        self.in_a_row += 1
        if self.in_a_row < self.in_a_row_limit:
            return "skip"
        if self.rollbacks >= self.rollback_limit:
            shown = ", ".join(sorted(set(videos))[:8]) + (" ..." if len(set(videos)) > 8 else "")
            raise NonFiniteTraining(
                f"step {step}: {self.in_a_row} steps in a row had a non-finite loss or gradient, after "
                f"{self.rollbacks} rollback(s) to the last checkpoint; {batch} held {shown}. "
                "Lower optim.lr (or base_lr), set train.grad_clip, or under fp16 use bf16"
            )
        self.rollbacks += 1
        self.in_a_row = 0
        return "rollback"
