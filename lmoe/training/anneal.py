"""Router temperature annealing: the softmax / top-k gates train at a temperature that moves
geometrically from TrainConfig.temperature_start to lmoe.temperature over the first
temperature_anneal_steps steps, then stays there; the adapter is saved (and serves) at
lmoe.temperature, the temperature training ended at."""

from __future__ import annotations

from torch import nn

from ..routers import Router


def annealed_temperature(start: float, end: float, anneal_steps: int, step: int) -> float:
    """The temperature of 0-based optimizer step `step`: start * (end / start) ** (step /
    anneal_steps), end from step anneal_steps on (and at once when anneal_steps is 0)."""
    if anneal_steps <= 0 or step >= anneal_steps:
        return end
    return start * (end / start) ** (step / anneal_steps)


def set_router_temperature(model: nn.Module, temperature: float) -> int:
    """Give every router of the model this temperature (a Python float: no device work);
    returns how many."""
    routers = [m for m in model.modules() if isinstance(m, Router)]
    for router in routers:
        router.temperature = temperature
    return len(routers)
