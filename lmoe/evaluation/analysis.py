"""Routing analysis: how many experts each token uses in each layer, how sure and how loaded the
routing is, and how much it specialises by skill or domain (I(domain; expert)); as a JSON
summary and PNG plots.

The model runs over named groups of batches under `lmoe.record_routing`; every real (unpadded)
token, or only every answer token (labels != -100), gives one routing vector g (E,) per layer. An
expert is active for a token when g_i > 0: always all E for softmax, k for top-k, a learned, varying
number for LD-MoLE. The statistics themselves are pure maths in lmoe.routing_stats.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from ..data.builtin import Mixture
from ..data.encoding import IGNORE, Example, collate, encode_all
from ..io import atomic_write
from ..routing_record import record_routing
from ..routing_stats import routing_stats, summary
from .generation import logits_to_keep
from .progress import phase

SUMMARY_FILE = "routing_summary.json"
TOKENS = {"all": "every real (unpadded) token", "answer": "answer tokens only (labels != -100)"}


# ---------------------------------------------------------------- collecting routing weights


def collect_routing(
    model: nn.Module,
    batches_by_name: Mapping[str, Iterable],
    tokens: str = "all",
    progress: bool = True,
) -> dict[str, dict[str, Tensor]]:
    """group name -> layer name -> (tokens, E) float32 CPU routing weights of the group's real
    tokens (tokens="all") or of its answer tokens (tokens="answer": where the batch's
    labels are not -100).

    A batch is a dict with "input_ids" (batch, T) and optionally "attention_mask" (padding is left
    out) and "labels", or a bare input_ids tensor. Runs in eval mode without gradients; the mode is
    restored. progress: a bar (or lines) on stderr, counting batches.
    """
    if tokens not in TOKENS:
        raise ValueError(
            f"collect_routing: tokens={tokens!r}; expected one of {', '.join(TOKENS)}."
        )
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    groups = {name: list(batches) for name, batches in batches_by_name.items()}
    out = {}
    try:
        with phase("routing analysis", sum(map(len, groups.values())), "batch", progress) as update:
            for name, batches in groups.items():
                out[name] = _route_group(model, batches, device, tokens == "answer", update)
    finally:
        model.train(was_training)
    return out


def _route_group(
    model: nn.Module,
    batches: list,
    device: torch.device,
    answers: bool,
    update: Callable[[int], None],
) -> dict[str, Tensor]:
    # per batch: which of its real tokens count, in the record's order (row-major, padding left out)
    keep = []
    with record_routing(model) as rec, torch.no_grad():  # the record leaves padding out
        for batch in batches:
            ids = batch["input_ids"] if isinstance(batch, Mapping) else batch
            mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
            mask = torch.ones_like(ids) if mask is None else mask
            # the routing is all that is read: the vocabulary projection runs for one position
            model(
                input_ids=ids.to(device), attention_mask=mask.to(device), **logits_to_keep(model, 1)
            )
            update(1)
            keep.append(
                _answer_tokens(batch, mask)
                if answers
                else torch.ones(int(mask.bool().sum()), dtype=torch.bool)
            )
        keep = torch.cat(keep) if keep else torch.zeros(0, dtype=torch.bool)
        weights = {}
        for layer in rec:
            g = rec[layer].float().cpu()
            if g.shape[0] != len(keep):
                raise RuntimeError(
                    f"Layer {layer} routed {g.shape[0]} tokens for {len(keep)} real input tokens; "
                    "analysis needs each mixture layer to run once per forward."
                )
            weights[layer] = g[keep]
    return weights


def _answer_tokens(batch, mask: Tensor) -> Tensor:
    """(real tokens,) bool: which real tokens of the batch are answer tokens."""
    if not isinstance(batch, Mapping) or "labels" not in batch:
        raise ValueError(
            "collect_routing(tokens='answer') needs batches with \"labels\" (e.g. from "
            "batches_by_domain / lmoe.data.encoding.collate); use tokens='all' for bare input_ids."
        )
    return (batch["labels"] != IGNORE)[mask.bool()].cpu()


def batches_by_domain(
    examples: list[Example], pad_id: int, batch_size: int = 16
) -> dict[str, list[dict]]:
    """Group encoded examples by their domain (skill, conversation domain or the group key's
    value) into padded batches of similar lengths (the statistics do not depend on the order)."""
    groups: dict[str, list[Example]] = {}
    for ex in examples:
        groups.setdefault(ex.domain, []).append(ex)
    for exs in groups.values():
        exs.sort(key=lambda ex: len(ex.input_ids))
    return {
        name: [collate(exs[i : i + batch_size], pad_id) for i in range(0, len(exs), batch_size)]
        for name, exs in groups.items()
    }


def held_out_batches(
    tokenizer, mixture: Mixture | None = None, max_length: int = 128
) -> dict[str, list[dict]]:
    """The built-in mixture's held-out skill items and conversations, batched per skill / domain."""
    mixture = Mixture() if mixture is None else mixture
    examples = encode_all(
        tokenizer, mixture.skill_items("test") + mixture.conversations("test"), max_length
    )
    return batches_by_domain(examples, tokenizer.pad_token_id)


# ---------------------------------------------------------------- statistics


def routing_summary(
    model: nn.Module, batches_by_name: Mapping[str, Iterable], tokens: str = "answer"
) -> dict:
    """The JSON-ready statistics (lmoe.routing_stats.summary) of the groups' routing,
    with the tokens used."""
    return {
        "tokens_used": TOKENS[tokens],
        **summary(routing_stats(collect_routing(model, batches_by_name, tokens))),
    }


def held_out_specialisation(
    model: nn.Module, tokenizer, mixture: Mixture | None = None, max_length: int = 128
) -> dict:
    """routing_summary on the answer tokens of the built-in mixture's held-out data, grouped by
    skill/domain: the routing entropy, I(domain; expert), top weight > 0.5 share, active experts
    and load, per layer."""
    return routing_summary(model, held_out_batches(tokenizer, mixture, max_length), "answer")


def mean_active_experts(model: nn.Module, batches: Iterable) -> dict[str, float]:
    """layer name -> mean number of active experts per real token over `batches`
    (for benchmarks)."""
    stats = routing_stats(collect_routing(model, {"all": batches}))
    return dict(zip(stats.layers, stats.mean_active.tolist(), strict=True))


def analyze(
    model: nn.Module,
    batches_by_name: Mapping[str, Iterable],
    out_dir: str | Path,
    tokens: str = "answer",
) -> dict:
    """Route every group's batches (every real token, or the answer tokens only), write
    out_dir/routing_summary.json and the PNG plots of lmoe.evaluation.plots.PLOT_FILES. Returns the
    summary.

    batches_by_name: group (skill or domain) name -> batches (see collect_routing).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    from .plots import PLOT_FILES, PLOTS  # matplotlib: loaded only where plots are drawn

    stats = routing_stats(collect_routing(model, batches_by_name, tokens))
    for key, plot in PLOTS.items():
        plot(stats, out / PLOT_FILES[key])
    result = {
        "tokens_used": TOKENS[tokens],
        **summary(stats),
        "files": {key: str(out / name) for key, name in PLOT_FILES.items()},
    }
    text = json.dumps(result, indent=2) + "\n"
    atomic_write(out / SUMMARY_FILE, lambda tmp: Path(tmp).write_text(text))
    return result
