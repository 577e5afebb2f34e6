"""An exponential moving average of the weights (``ema`` in the spec), with torch's own
``AveragedModel`` and its EMA update: every ``every_steps`` optimizer steps,
``average = decay * average + (1 - decay) * weights``, over parameters and buffers (BatchNorm's
running statistics included, as torchvision's reference recipes do).

Until ``warmup_steps`` the average copies the weights instead (the first updates of a network
trained from scratch would otherwise anchor the average to its random start). Every rank keeps
the same average, so each evaluates its slice of the validation split with it: DDP keeps the
parameters equal, and the buffers (BatchNorm's running statistics, which each rank updates from
its own batch until DDP's next forward sends rank 0's) are taken from rank 0 before an update.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from wrn_cluster.spec.classify import EmaSection


class WeightAverage:
    def __init__(self, net: nn.Module, section: EmaSection) -> None:
        self.section = section
        self.model = AveragedModel(
            net, multi_avg_fn=get_ema_multi_avg_fn(section.decay), use_buffers=True
        )
        self.model.eval()

    @property
    def network(self) -> nn.Module:
        """The averaged network (evaluated, checkpointed and, when better, registered)."""
        return self.model.module

    def after_step(self, step: int, net: nn.Module) -> None:
        """Called after optimizer step ``step`` (1-based) with the bare (unwrapped) network."""
        if step % self.section.every_steps:
            return
        if dist.is_initialized() and dist.get_world_size() > 1:
            for buffer in net.buffers():  # what DDP's next forward would send anyway
                dist.broadcast(buffer, src=0)
        if step <= self.section.warmup_steps:
            self.model.n_averaged.zero_()  # the next update copies the weights
        self.model.update_parameters(net)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged network's weights, keyed as the network's own state dict."""
        return self.network.state_dict()

    @property
    def updates(self) -> int:
        return int(self.model.n_averaged)

    def load(self, weights: dict[str, torch.Tensor], updates: int) -> None:
        self.network.load_state_dict(weights)
        self.model.n_averaged.fill_(updates)

    def start_from(self, net: nn.Module) -> None:
        """An average of ``net`` as it is, for a checkpoint written without one."""
        self.network.load_state_dict(net.state_dict())
        self.model.n_averaged.fill_(1)
