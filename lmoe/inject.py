"""Put MoLoRALinear layers into any nn.Module, freeze the rest, fold the router losses into the
model's loss, and read them back (lmoe.routing_record reads the routing)."""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .config import ALL_LINEAR, AUX_COEFS, LMoEConfig, default_lambda_hidden
from .layer import MoLoRALinear, TokenMask, is_linear, linear_shape
from .remix import fold_outputs, repeat_inputs
from .router_losses import AuxStats

log = logging.getLogger(__name__)
CONFIG_ATTR = "lmoe_config"
HOOKS_ATTR = "_lmoe_hooks"  # forward hooks inject added (attention mask, lambda-head caching)
MASK_ATTR = "_lmoe_token_mask"  # the TokenMask the model's layers share
HEADS_ATTR = (
    "_lmoe_lambda_heads"  # LD-MoLE's shared lambda heads (a list), whose cache the hooks clear
)
FROZEN_ATTR = "_lmoe_frozen"  # names of parameters inject froze, so remove can thaw them
APART_ATTR = "_lmoe_aux_apart"  # inside aux_loss_apart: the model's loss is the LM loss alone
FOLDED_ATTR = (
    "_lmoe_aux_folded"  # the last forward's loss holds its router losses (aux_loss then gives 0)
)
REMIX_ATTR = "_lmoe_remix_samples"  # M while a forward runs ReMix's M copies per sequence, else 0
QUANTIZED_ATTR = (
    "_hf_peft_config_loaded"  # transformers' mark that a quantised model carries trainable adapters
)


def unwrapped(model: nn.Module) -> nn.Module:
    """The transformers model inside a PeftModel (peft.get_peft_model with an LMoEConfig), else
    model itself: layer names are then the same whether a PeftModel or the model
    inside it is passed."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def lmoe_layers(model: nn.Module) -> Iterator[tuple[str, MoLoRALinear]]:
    """(qualified name, layer) for every mixture layer in the model (or the PeftModel's
    model), in module order."""
    for name, module in unwrapped(model).named_modules():
        if isinstance(module, MoLoRALinear):
            yield name, module


def _output_head_names(model: nn.Module) -> set[str]:
    """Names of linear layers that produce the vocabulary logits ("all-linear" skips them)."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return {name for name, module in model.named_modules() if module is head} | {"lm_head"}


def find_targets(model: nn.Module, cfg: LMoEConfig) -> list[str]:
    """Dotted names of the linear layers cfg.target_modules selects; an error if there are none."""
    linear = [name for name, module in model.named_modules() if name and is_linear(module)]
    targets = cfg.target_modules
    if targets == ALL_LINEAR:
        heads = _output_head_names(model)
        chosen = [n for n in linear if n not in heads]
    elif isinstance(targets, str):
        pattern = re.compile(targets)
        chosen = [n for n in linear if pattern.fullmatch(n)]
    else:
        chosen = [n for n in linear if any(n == t or n.endswith("." + t) for t in targets)]
    if not chosen:
        suffixes = sorted({n.rsplit(".", 1)[-1] for n in linear})
        raise ValueError(
            f"LMoEConfig.target_modules={targets!r} matches no linear layer in "
            f"{type(model).__name__}. Its linear layers end in: "
            f"{', '.join(suffixes) or '(none)'}; use some of those names, a regex on the full "
            f'dotted name, or "{ALL_LINEAR}".'
        )
    return chosen


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def inject(model: nn.Module, cfg: LMoEConfig) -> nn.Module:
    """Wrap the target layers with experts + router, in place; freeze everything
    else. Returns model."""
    if any(True for _ in lmoe_layers(model)):
        raise ValueError(
            "This model already has lmoe layers; call lmoe.remove(model) before injecting again."
        )
    targets = find_targets(model, cfg)
    cfg = with_lambda_width(cfg, [linear_shape(model.get_submodule(name))[0] for name in targets])
    frozen = [name for name, p in model.named_parameters() if p.requires_grad]
    for p in model.parameters():
        p.requires_grad_(False)
    # LD-MoLE: one lambda head per input width, shared by all layers (dynamic router)
    lambda_heads: dict = {}
    mask = TokenMask()
    for name in targets:
        layer = MoLoRALinear(model.get_submodule(name), cfg, lambda_heads)
        layer.token_mask = mask
        _set_submodule(model, name, layer)
    setattr(model, CONFIG_ATTR, cfg)
    setattr(model, FROZEN_ATTR, frozen)
    setattr(model, MASK_ATTR, mask)
    setattr(
        model,
        HOOKS_ATTR,
        _mask_hooks(model) + _lambda_cache_hooks(model, list(lambda_heads.values())),
    )
    if getattr(
        model, "is_quantized", False
    ):  # else Trainer refuses it as "purely quantized" (as not a PeftModel)
        setattr(model, QUANTIZED_ATTR, True)
    trainable, total = count_parameters(model)
    log.debug(
        "lmoe: %d layers, trainable params %s of %s (%.3f%%)",  # lmoe train prints its own
        len(targets),
        f"{trainable:,}",
        f"{total:,}",
        100 * trainable / max(total, 1),
    )
    return model


def with_lambda_width(cfg: LMoEConfig, input_widths: list[int]) -> LMoEConfig:
    """cfg with lambda_hidden fixed for a model (dynamic router, left unset): one width for all its
    lambda heads, as the authors use, from the narrowest input of the target layers (a
    transformer's hidden size)."""
    if cfg.router != "dynamic" or cfg.lambda_hidden is not None:
        return cfg
    return dataclasses.replace(cfg, lambda_hidden=default_lambda_hidden(min(input_widths)))


def _mask_hooks(model: nn.Module) -> list:
    """Show the layers the attention_mask (batch, seq) a model forward is called with, for that
    forward, and add the router losses to the loss of a training forward with labels
    (add_aux_to_loss). With router="remix", a training forward runs each sequence under
    remix_samples drawn routings and returns one row per sequence, the RLOO estimator in its loss
    (lmoe.remix).

    The hooks reach the mask through the model they run on (a deep copy uses its own) and are
    module-level functions (a pickled model keeps them).
    """
    return [
        model.register_forward_pre_hook(_capture_mask, with_kwargs=True),
        model.register_forward_hook(_release_mask, with_kwargs=True),
    ]


def _capture_mask(model: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    if (
        model.training
    ):  # the last step's routing (a few (tokens, E) tensors per layer) is not kept into this one
        for _, layer in lmoe_layers(model):
            layer.forget_routing()
    if kwargs.get("fused_lm_head"):
        _check_head_not_adapted(model)
    setattr(model, FOLDED_ATTR, False)
    samples = _remix_samples(model, kwargs)
    setattr(model, REMIX_ATTR, samples)
    if samples:
        args, kwargs = repeat_inputs(args, kwargs, samples)
    mask = kwargs.get("attention_mask")
    getattr(model, MASK_ATTR).value = mask if isinstance(mask, Tensor) else None
    return (args, kwargs) if samples else None


def _release_mask(model: nn.Module, args: tuple, kwargs: dict, output):
    getattr(model, MASK_ATTR).value = None
    samples = getattr(model, REMIX_ATTR, 0)
    if samples and isinstance(output, dict):
        setattr(model, REMIX_ATTR, 0)
        log_probs = [
            layer.last_routing[0].extras["log_prob"]
            for _, layer in lmoe_layers(model)
            if layer.last_routing is not None and "log_prob" in layer.last_routing[0].extras
        ]
        smoothing = getattr(getattr(model, "loss_function", None), "label_smoothing", 0.0)
        output = fold_outputs(output, kwargs, log_probs, samples, smoothing)
    return add_aux_to_loss(model, kwargs, output)


def _remix_samples(model: nn.Module, kwargs: dict) -> int:
    """remix_samples where this forward trains a ReMix router (training, autograd on), else 0."""
    cfg = getattr(model, CONFIG_ATTR)
    if cfg.router != "remix" or not model.training or not torch.is_grad_enabled():
        return 0
    if kwargs.get("labels") is None and kwargs.get("shift_labels") is None:
        raise ValueError(
            "router='remix' learns its routing from the loss of each drawn routing: call the model "
            "with labels= in training (or model.eval() for a forward without them)."
        )
    return cfg.remix_samples


def _check_head_not_adapted(model: nn.Module) -> None:
    """TRL's fused LM head multiplies the hidden states by lm_head.weight itself: experts
    there would not train."""
    get = getattr(model, "get_output_embeddings", None)
    if callable(get) and isinstance(get(), MoLoRALinear):
        raise ValueError(
            "lmoe experts on the output head (lm_head) do not train under TRL's SFTTrainer: its "
            "loss multiplies the hidden states by lm_head.weight directly. Remove 'lm_head' from "
            'LMoEConfig.target_modules ("all-linear" leaves it out).'
        )


# -------------------------------------------------------- the router losses inside the model's loss


def add_aux_to_loss(model: nn.Module, kwargs: dict, output):
    """A training forward with labels returns loss = LM loss + w * aux_loss and output.aux_loss =
    aux_loss, as transformers' MoE models do, so any training loop trains the routers. w = 1, or,
    where the loss is summed over the tokens of a whole optimizer step (Trainer's
    num_items_in_batch), this micro-batch's share of those tokens: the router losses of the step
    then count once, weighted like the tokens.

    TRL's fused head (FusedCausalLMOutput) recomputes the loss from log_probs: they get w *
    aux_loss's gradient (their values unchanged), so TRL's loss trains the routers too.
    """
    labels = kwargs.get("shift_labels", kwargs.get("labels"))
    if (
        not model.training
        or getattr(model, APART_ATTR, 0)
        or labels is None
        or not isinstance(output, dict)
        or output.get("loss") is None
        or not any(layer.last_aux is not None for _, layer in lmoe_layers(model))
    ):
        return output
    aux = aux_loss(model)
    share = _token_share(
        labels if "shift_labels" in kwargs else labels[..., 1:], kwargs.get("num_items_in_batch")
    )
    scaled = aux if share is None else aux * share
    output = _with_aux_field(output)
    output["loss"] = output["loss"] + scaled
    output["aux_loss"] = aux
    if (
        output.get("log_probs") is not None and output.get("label_mask") is not None
    ):  # TRL: loss = -sum(log_probs) / N
        output["log_probs"] = output["log_probs"] - (aux - aux.detach()) * output["label_mask"]
    setattr(model, FOLDED_ATTR, True)
    return output


_WITH_AUX: dict[type, type] = {}  # output class -> its subclass with an aux_loss field


def _with_aux_field(output):
    """output as an instance of a class with an aux_loss field: DDP rebuilds outputs as
    type(output)(**output)."""
    cls = type(output)
    if not dataclasses.is_dataclass(cls) or "aux_loss" in {f.name for f in dataclasses.fields(cls)}:
        return output
    if cls not in _WITH_AUX:
        _WITH_AUX[cls] = dataclasses.make_dataclass(
            cls.__name__,
            [("aux_loss", Tensor | None, dataclasses.field(default=None))],
            bases=(cls,),
        )
    return _WITH_AUX[cls](**output)


def _token_share(labels: Tensor, num_items_in_batch) -> Tensor | None:
    """This micro-batch's answer tokens over num_items_in_batch (None without it). Under
    torch.distributed, the micro-batch's tokens of all processes over num_items_in_batch times their
    number: Trainer (with its default average_tokens_across_devices) counts all processes' tokens in
    num_items_in_batch and multiplies each loss by the number of processes, DDP averages, and each
    process's aux_loss averaged is that of all their tokens."""
    if num_items_in_batch is None:
        return None
    tokens = (labels != -100).sum().float()
    ranks = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if ranks > 1:
        dist.all_reduce(tokens)
    return tokens / (torch.as_tensor(num_items_in_batch, device=tokens.device).float() * ranks)


@contextmanager
def aux_loss_apart(model: nn.Module):
    """Inside the block the model's loss is the LM loss alone and aux_loss(model) gives the router
    losses, for a loop that weighs them itself (lmoe train, LMoETrainer)."""
    setattr(model, APART_ATTR, getattr(model, APART_ATTR, 0) + 1)
    try:
        yield model
    finally:
        setattr(model, APART_ATTR, getattr(model, APART_ATTR) - 1)


def _lambda_cache_hooks(model: nn.Module, heads: list) -> list:
    """Clear the shared lambda heads' reuse cache before and after each model forward: nothing is
    reused across forwards, and nothing is held after one (a checkpointed re-run refills it
    briefly). Module-level hook functions that find the heads through the model: copies and
    pickles keep working."""
    if not heads:
        return []
    for head in heads:
        head.caching = True
    setattr(model, HEADS_ATTR, heads)
    return [
        model.register_forward_pre_hook(_clear_lambda_caches),
        model.register_forward_hook(_clear_lambda_caches),
    ]


def _clear_lambda_caches(model: nn.Module, *_) -> None:
    for head in getattr(model, HEADS_ATTR):
        head.clear_cache()


def remove(model: nn.Module) -> nn.Module:
    """Put the original base layers back (adapters dropped, trainability restored), in
    place. Returns model."""
    model = unwrapped(model)
    for name, layer in list(lmoe_layers(model)):
        _set_submodule(model, name, layer.base)
    params = dict(model.named_parameters())
    for name in getattr(model, FROZEN_ATTR, []):
        params[name].requires_grad_(True)
    for handle in getattr(model, HOOKS_ATTR, []):
        handle.remove()
    for attr in (
        CONFIG_ATTR,
        FROZEN_ATTR,
        HOOKS_ATTR,
        MASK_ATTR,
        HEADS_ATTR,
        APART_ATTR,
        FOLDED_ATTR,
        REMIX_ATTR,
        QUANTIZED_ATTR,
    ):
        if attr in vars(
            model
        ):  # not the class's own value (transformers has one for QUANTIZED_ATTR)
            delattr(model, attr)
    return model


def shared_modules(model: nn.Module) -> list[nn.Module]:
    """The outermost modules that sit under more than one name, e.g. LD-MoLE's lambda heads, which
    every layer of an input width shares (FSDP must give them one owner)."""
    uses: dict[int, int] = {}
    for _, module in model.named_modules(remove_duplicate=False):
        uses[id(module)] = uses.get(id(module), 0) + 1
    shared = [m for m in model.modules() if uses[id(m)] > 1]
    inner = {id(sub) for m in shared for sub in m.modules() if sub is not m}
    return [m for m in shared if id(m) not in inner]


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def get_config(model: nn.Module) -> LMoEConfig:
    cfg = getattr(model, CONFIG_ATTR, None)
    if cfg is None:
        raise ValueError(
            "This model has no lmoe adapters; call lmoe.inject(model, cfg) or load_adapter first."
        )
    return cfg


def aux_losses(model: nn.Module) -> dict[str, Tensor]:
    """Each auxiliary loss of the last training forward, averaged over layers (unweighted).

    Under torch.distributed every process must call it after the same forward: the value of each
    process, averaged over processes (as DDP/FSDP average gradients), is the loss of all their
    tokens together, in value and in gradient (see AuxStats).
    """
    stats = [layer.last_aux for _, layer in lmoe_layers(model) if layer.last_aux is not None]
    sum_counts_over_processes(stats)
    sums: dict[str, Tensor] = {}
    counts: dict[str, int] = {}
    for layer_stats in stats:
        for key, value in layer_stats.losses().items():
            sums[key] = sums[key] + value if key in sums else value
            counts[key] = counts.get(key, 0) + 1
    return {key: sums[key] / counts[key] for key in sums}


def sum_counts_over_processes(stats: list[AuxStats]) -> None:
    """Replace the layers' token and dispatch counts by their sums over all processes, in place: one
    all-reduce for all layers, once per forward (counts already summed are left alone)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    todo = [s for s in stats if s.ranks == 1]
    if not todo:
        return
    device = todo[0].counts.device
    flat = torch.cat(
        [s.counts.to(device, torch.float32) for s in todo]
    )  # float32 counts are exact below 2^24
    dist.all_reduce(flat)
    for s, total in zip(todo, flat.split([s.counts.numel() for s in todo]), strict=True):
        s.counts, s.ranks = total.to(s.counts), dist.get_world_size()


def aux_loss(model: nn.Module) -> Tensor:
    """sum_k coef_k * (loss k averaged over layers), from the last training forward, that its loss
    does not hold yet: 0 if none ran, and 0 after a forward with labels (whose output.loss has it,
    output.aux_loss shows it), so `out.loss + aux_loss(model)` counts it once."""
    cfg = get_config(model)
    terms = [
        getattr(cfg, AUX_COEFS[key]) * value
        for key, value in aux_losses(model).items()
        if getattr(cfg, AUX_COEFS[key])
    ]
    if terms and not getattr(model, FOLDED_ATTR, False):
        return torch.stack(terms).sum()
    return torch.zeros((), device=next(model.parameters()).device)
