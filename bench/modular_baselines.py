"""PEFT 0.21's two ways to route over a library of LoRA adapters, the baselines of bench/modular.py.

- Arrow (`arrow_model`): training-free. In each adapted layer, adapter i's prototype is the top
  right singular vector v_i of its update B_i A_i; a token with layer input x scores |<v_i, x>|,
  keeps the top_k adapters and weighs their outputs s_i B_i A_i x by a softmax of those scores at
  router_temperature (others get 0).
- X-LoRA (`xlora_model`; bench/modular_parts.fit trains it): a classifier on the base model's last
  hidden state gives every token one weight per adapter (the same in all layers unless
  layerwise_scalings). Each forward runs the model twice: once with the adapters off for those
  hidden states, once with the weighted adapters. Only the classifier trains.

    # X-LoRA's step cost
    .venv/bin/python bench/modular_baselines.py [--hidden 576 --layers 6 --experts 4]

Measured so (CPU seconds per step, 1 thread, batch 8 x 128, q/v/up_proj, rank 4, 4 adapters): an
X-LoRA step costs 1.82x a PEFT LoRA step at hidden 576, 6 layers (2.78 vs 1.53 s), 1.97x at 256, 4
layers; lmoe's router-only step on the composed adapters 0.99-1.03x. Its first pass is a whole
no-grad forward (logits and loss included), and it runs its adapters one by one.

Both wrap the base model in place (PEFT injects its layers): give each its own freshly loaded base.
Arrow's model is PEFT's PeftModel and is scored with lmoe.evaluation.scoring's shared KV cache
(routing is per token, so a cached prefix changes nothing). X-LoRA's is not: its first pass would
write into the cache of its second, and the scores come out silently wrong, so xlora_model returns a
wrapper that refuses a cache and has no `config`, which lmoe.evaluation.scoring then scores
sequence by sequence.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, XLoraConfig, get_peft_model
from peft.tuners.lora.arrow import create_arrow_model
from peft.tuners.lora.config import ArrowConfig
from torch import Tensor, nn

sys.path.insert(
    0, str(Path(__file__).resolve().parent.parent)
)  # run as a file: the repository root
from lmoe import compose, freeze_experts  # noqa: E402
from lmoe.io import is_lmoe_adapter  # noqa: E402
from lmoe.modular.compose import PEFT_PREFIX, LoRA, read_peft_lora  # noqa: E402

# PEFT's own defaults, read from the installed peft: top_k 3, router_temperature 1.0, use_gks
# False, rng_seed None
ARROW_DEFAULTS = {f.name: f.default for f in dataclasses.fields(ArrowConfig) if f.init}
# The one other setting: hard routing. Arrow's scores are |<v_i, x>| on the raw layer inputs (not a
# cosine), so its temperature works on their scale: on the built-in SmolLM2-135M |x| is 1-3 (q_proj
# of layer 0: 1.1, up_proj of layer 15: 3.3), the scores 0.03-0.12 (4 random adapters), and at
# temperature 1 the top-3 weights are near uniform (largest 0.34-0.39, 1/3 is uniform). top_k=1
# routes each token to its best adapter whatever the scale.
ARROW_OTHER = {"top_k": 1, "router_temperature": ARROW_DEFAULTS["router_temperature"]}
ARROW_ADAPTER = "arrow_router"  # the adapter name create_arrow_model gives its router
XLORA_DEFAULTS = {
    f.name: f.default
    for f in dataclasses.fields(XLoraConfig)
    if f.name
    in (
        "xlora_depth",
        "xlora_size",
        "layerwise_scalings",
        "enable_softmax",
        "softmax_temperature",
        "top_k_lora",
        "scaling_pass_value",
    )
}


def _library(adapter_dirs: Sequence[str | Path]) -> list[LoRA]:
    """The adapters as lmoe reads them (a clear error for anything but a plain PEFT LoRA), all
    on one module set."""
    if not adapter_dirs:
        raise ValueError(
            "No adapter directories given; pass the PEFT LoRA directories (adapter_config.json + "
            "adapter_model.safetensors) to route over."
        )
    for d in adapter_dirs:
        if is_lmoe_adapter(d):
            raise ValueError(
                f"{d} is an lmoe adapter; PEFT's Arrow and X-LoRA load PEFT LoRA files. Write one "
                f"with lmoe.export_peft(lmoe.load_adapter(base, {str(d)!r}), OUT, torch.ones(1))."
            )
    loras = [read_peft_lora(d) for d in adapter_dirs]
    for lora in loras[1:]:
        if set(lora.modules) != set(loras[0].modules):
            odd = sorted(set(lora.modules) ^ set(loras[0].modules))
            raise ValueError(
                f"Adapter {lora.path} adapts other modules than {loras[0].path} (e.g. {odd[0]}); "
                "Arrow and X-LoRA route over adapters of the same target modules: retrain it on "
                "them."
            )
    return loras


# ---------------------------------------------------------------- Arrow


def arrow_model(
    base_model: nn.Module,
    adapter_dirs: Sequence[str | Path],
    top_k: int = ARROW_DEFAULTS["top_k"],
    temperature: float = ARROW_DEFAULTS["router_temperature"],
    rng_seed: int | None = 0,
) -> PeftModel:
    """PEFT's Arrow over the adapters (expert i = adapter_dirs[i], named task_i),
    frozen, in eval mode.

    rng_seed seeds the power iteration that finds each prototype (15 steps from a random start;
    PEFT's default None starts anywhere, so two builds differ by its convergence error): 0 makes
    the build repeatable.
    """
    loras = _library(adapter_dirs)
    ranks = sorted({lora.rank for lora in loras})
    if len(ranks) > 1:
        raise ValueError(
            f"The adapters have ranks {ranks}; PEFT's Arrow needs one rank for all. Retrain them "
            "at one rank (lmoe.modular.compose zero-pads mixed ranks, Arrow does not)."
        )
    if not 1 <= top_k <= len(loras):
        raise ValueError(
            f"Arrow's top_k={top_k} must be between 1 and the number of adapters ({len(loras)}); "
            f"pass top_k={min(max(top_k, 1), len(loras))}."
        )
    config = ArrowConfig(top_k=top_k, router_temperature=temperature, rng_seed=rng_seed)
    model = create_arrow_model(base_model, [str(d) for d in adapter_dirs], config)
    model.requires_grad_(
        False
    )  # training-free; create_arrow_model leaves its (unused) router LoRA trainable
    return model.eval()


def arrow_weights(x: Tensor, prototypes: Tensor, top_k: int, temperature: float) -> Tensor:
    """Arrow's routing (tokens, E) of x (tokens, d_in) over prototypes (E, d_in), as PEFT computes
    it: softmax over the top_k of |<v_i, x>| at the temperature, 0 for the others."""
    score = (x @ prototypes.T).abs()  # (tokens, E)
    top, index = score.topk(top_k, dim=-1)
    return torch.zeros_like(score).scatter(-1, index, torch.softmax(top / temperature, dim=-1))


@contextmanager
def record_arrow_routing(model: PeftModel) -> Iterator[dict[str, Tensor]]:
    """Arrow's routing weights in every forward of the block: rec[layer] -> (tokens, E), layers
    named as in lmoe.lmoe_layers of the composed base. Rows are the tokens of input_ids.flatten(),
    padding included (keep attention_mask.flatten().bool()); filled when the block ends."""
    rows: dict[str, list[Tensor]] = {}
    handles = []
    for name, module in model.named_modules():
        if ARROW_ADAPTER in getattr(module, "lora_arrow", {}):
            handles.append(
                module.lora_arrow[ARROW_ADAPTER].register_forward_hook(
                    _arrow_recorder(rows.setdefault(name.removeprefix(PEFT_PREFIX), []))
                )
            )
    if not handles:
        raise ValueError(
            "record_arrow_routing needs a model built by arrow_model (create_arrow_model)."
        )
    record: dict[str, Tensor] = {}
    try:
        yield record
    finally:
        for handle in handles:
            handle.remove()
        record.update({name: torch.cat(parts) for name, parts in rows.items() if parts})


def _arrow_recorder(rows: list[Tensor]):
    def hook(arrow: nn.Module, args: tuple, _output: Tensor) -> None:
        x = args[0].reshape(-1, args[0].shape[-1]).to(arrow.prototypes.dtype)  # (tokens, d_in)
        rows.append(
            arrow_weights(x, arrow.prototypes, arrow.top_k, arrow.temperature)
            .detach()
            .float()
            .cpu()
        )

    return hook


# ---------------------------------------------------------------- X-LoRA


class NoCacheLM(nn.Module):
    """A causal LM that runs without a KV cache. It has no `config`, so lmoe.evaluation.scoring
    scores every prefix and continuation as a whole sequence; `.peft` is the PEFT model inside."""

    def __init__(self, peft_model: nn.Module) -> None:
        super().__init__()
        self.peft = peft_model

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
        **kwargs,
    ):
        if kwargs.pop("use_cache", False) or any(
            kwargs.get(k) is not None for k in ("past_key_values", "cache")
        ):
            raise ValueError(
                "X-LoRA cannot use a KV cache: its scaling pass (adapters off) and its real pass "
                "would write the same cache. Score whole sequences (lmoe.evaluation.scoring does "
                "for this model)."
            )
        return self.peft(
            input_ids=input_ids,
            attention_mask=attention_mask,
            labels=labels,
            use_cache=False,
            **kwargs,
        )


def xlora_model(
    base_model: nn.Module,
    adapter_dirs: Sequence[str | Path],
    depth: int = XLORA_DEFAULTS["xlora_depth"],
    **options,
) -> NoCacheLM:
    """PEFT's X-LoRA over the adapters (frozen), its classifier freshly initialised and the
    only trainable part.

    depth: the classifier's layers (1: one linear map hidden -> E, PEFT's default); options: other
    XLoraConfig fields (layerwise_scalings, softmax_temperature, top_k_lora, xlora_size,
    xlora_dropout_p, ...). Sets base_model.config.use_cache = False, which X-LoRA requires.
    """
    _library(adapter_dirs)
    # PEFT loads adapter i under the name str(i) and then activates the dict's
    # keys: other keys break it
    base_model.config.use_cache = False
    config = XLoraConfig(
        task_type="CAUSAL_LM",
        hidden_size=base_model.config.hidden_size,
        xlora_depth=depth,
        adapters={str(i): str(d) for i, d in enumerate(adapter_dirs)},
        **options,
    )
    return NoCacheLM(get_peft_model(base_model, config)).eval()


# ---------------------------------------------------- random adapters and the step-cost measurement


def save_random_lora(
    model: nn.Module,
    directory: str | Path,
    rank: int,
    target_modules: list[str],
    seed: int,
    std: float = 0.3,
) -> Path:
    """A PEFT LoRA adapter of model (left unchanged) with A at PEFT's init and B ~ N(0, std^2),
    saved to directory."""
    torch.manual_seed(seed)
    peft_model = get_peft_model(
        copy.deepcopy(model), LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=target_modules)
    )
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, std)
    peft_model.save_pretrained(str(directory))
    return Path(directory)


def step_seconds(
    models: dict[str, nn.Module], batch: dict[str, Tensor], steps: int
) -> dict[str, float]:
    """Median CPU seconds of each model's training step (forward, backward, AdamW over what requires
    grad), the models taking turns step by step so that a change in the machine's load hits all
    alike; after one warm-up. CPU time, not wall time: on a shared machine other jobs' load moves
    wall times by multiples."""
    optimizers = {
        name: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
        for name, m in models.items()
    }
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(steps + 1):
        for name, model in models.items():
            model.train()
            start = time.process_time()
            model(**batch).loss.backward()
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)
            times[name].append(time.process_time() - start)
            model.eval()
    return {name: statistics.median(t[1:]) for name, t in times.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="X-LoRA's training step against a LoRA step and lmoe's router-only "
        "step on a random Llama (no downloads; ratios, not absolute speed)."
    )
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: CPU time is compute, not waiting)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=2048,
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=args.hidden * 8 // 3,
        tie_word_embeddings=True,
    )
    fresh = lambda: LlamaForCausalLM(config).eval()  # noqa: E731 - random weights: only the cost matters
    targets = ["q_proj", "v_proj", "up_proj"]
    ids = torch.randint(
        0, config.vocab_size, (args.batch, args.length), generator=torch.Generator().manual_seed(0)
    )
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    with tempfile.TemporaryDirectory() as tmp:
        dirs = [
            save_random_lora(fresh(), Path(tmp) / f"a{i}", args.rank, targets, seed=i)
            for i in range(args.experts)
        ]
        lora = get_peft_model(
            fresh(), LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=targets)
        )
        composed = compose(fresh(), dirs)
        freeze_experts(composed)
        seconds = step_seconds(
            {
                f"PEFT LoRA r={args.rank} (trained)": lora,
                f"lmoe compose, {args.experts} experts (router trained)": composed,
                f"X-LoRA, {args.experts} adapters (classifier trained)": xlora_model(fresh(), dirs),
            },
            batch,
            args.steps,
        )
    reference = next(iter(seconds.values()))
    print(
        f"Llama hidden {args.hidden}, {args.layers} layers, batch {args.batch} x {args.length}, "
        f"{torch.get_num_threads()} threads, median of {args.steps} steps taken in turn\n"
    )
    print("| step | CPU s/step | x LoRA |\n|---|---|---|")
    for name, s in seconds.items():
        print(f"| {name} | {s:.3f} | {s / reference:.2f} |")


if __name__ == "__main__":
    main()
