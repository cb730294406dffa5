"""The CUDA paths: layer maths on the GPU against float64 on the CPU, no host sync in the routed
forward and backward, bf16 autocast training of a model, and `lmoe train` on one GPU. Skipped
where there is no GPU."""

import copy

import pytest
import torch
from conftest import VOCAB, tiny_model
from test_layer import COMPOSITIONS, ROUTERS, make_layer

from lmoe import LMoEConfig, aux_loss, inject, lmoe_layers

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")


def assert_close_to(gpu: torch.Tensor, ref: torch.Tensor, msg: str = "") -> None:
    """float32 on the GPU against float64: errors relative to the largest value, not elementwise."""
    torch.testing.assert_close(
        gpu.double().cpu(), ref, rtol=0, atol=1e-5 * float(ref.detach().abs().max()), msg=msg
    )


@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("composition", COMPOSITIONS)
def test_layer_on_the_gpu_equals_float64_on_the_cpu(router, composition):
    ref = make_layer(router, composition, E=4, r=4, d_in=64, d_out=48)
    gpu = copy.deepcopy(ref).float().to(CUDA)
    x = torch.randn(3, 17, 64, dtype=torch.float64, requires_grad=True)
    x_gpu = x.detach().float().to(CUDA).requires_grad_()
    dy = torch.randn(3, 17, 48, dtype=torch.float64)
    y, y_gpu = ref(x), gpu(x_gpu)
    assert_close_to(y_gpu, y)
    y.backward(dy)
    y_gpu.backward(dy.float().to(CUDA))
    assert_close_to(x_gpu.grad, x.grad)
    for (name, p), p_gpu in zip(ref.named_parameters(), gpu.parameters(), strict=True):
        if p.requires_grad:
            assert_close_to(p_gpu.grad, p.grad, msg=name)


@pytest.mark.parametrize("router", ["topk", "dynamic"])
@pytest.mark.parametrize("composition", COMPOSITIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_path_on_the_gpu_equals_float64_on_the_cpu(router, composition, dtype):
    """execution=sparse on the GPU (bfloat16: torch's grouped GEMM; float32: the per-expert loop)
    against the float64 CPU layer, 48 tokens (pairs grouped by expert) and 1 (each token's
    experts gathered)."""
    ref = make_layer(router, composition, E=16, r=8, d_in=64, d_out=48)
    gpu = copy.deepcopy(ref).to(CUDA, dtype)
    gpu.execution = "sparse"
    tolerance = 1e-5 if dtype == torch.float32 else 3e-2
    for shape in [(3, 16, 64), (1, 1, 64)]:
        x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
        x_gpu = x.detach().to(CUDA, dtype).requires_grad_()
        y, y_gpu = ref(x), gpu(x_gpu)
        scale = float(y.detach().abs().max())
        torch.testing.assert_close(y_gpu.double().cpu(), y, rtol=0, atol=tolerance * scale)
        dy = torch.randn_like(y)
        y.backward(dy)
        y_gpu.backward(dy.to(CUDA, dtype))
        for (name, p), p_gpu in zip(ref.named_parameters(), gpu.parameters(), strict=True):
            if p.requires_grad:
                torch.testing.assert_close(
                    p_gpu.grad.double().cpu(),
                    p.grad,
                    rtol=0,
                    atol=tolerance * float(p.grad.abs().max()) + 1e-12,
                    msg=name,
                )
        ref.zero_grad()
        gpu.zero_grad()


def test_sparse_topk_under_bf16_autocast_makes_no_host_sync():
    torch.manual_seed(0)
    model = (
        inject(
            TwoLayers(),
            LMoEConfig(
                num_experts=16,
                rank=8,
                router="topk",
                execution="sparse",
                target_modules=["up", "down"],
                load_balance_coef=0.01,
            ),
        )
        .to(CUDA)
        .train()
    )
    x = torch.randn(2, 33, 64, device=CUDA)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(x).float().square().mean() + aux_loss(model)
        loss.backward()

    step()  # warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


class TwoLayers(torch.nn.Module):
    """A plain module (no transformers code, which may sync on its own) with two routed layers."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = torch.nn.Linear(64, 96), torch.nn.Linear(96, 64)

    def forward(self, x, attention_mask=None):
        return self.down(torch.relu(self.up(x)))


@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("composition", COMPOSITIONS)
def test_routed_forward_backward_and_aux_losses_make_no_host_sync(router, composition):
    torch.manual_seed(0)
    model = inject(
        TwoLayers(),
        LMoEConfig(
            num_experts=4,
            rank=4,
            router=router,
            composition=composition,
            target_modules=["up", "down"],
            load_balance_coef=0.01,
            z_loss_coef=0.001,
            sparsity_coef=0.1,
            lambda_hidden=16,
        ),
    )
    model.to(CUDA).train()
    x = torch.randn(2, 33, 64, device=CUDA)
    mask = torch.ones(2, 33, device=CUDA, dtype=torch.long)
    mask[1, 20:] = 0
    model(x, attention_mask=mask).sum().backward()  # warm-up: lazy CUDA initialisation may sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = model(x, attention_mask=mask).square().mean() + aux_loss(model)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("router", ROUTERS)
def test_bf16_autocast_training_on_the_gpu_learns_and_leaves_the_base_alone(router):
    model = tiny_model("llama").to(CUDA)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    inject(model, LMoEConfig(num_experts=4, rank=4, router=router, target_modules="all-linear"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    ids = torch.randint(
        0, VOCAB, (4, 16), device=CUDA, generator=torch.Generator(CUDA).manual_seed(0)
    )
    losses = []
    for _ in range(30):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss + aux_loss(model)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss))
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < 0.95 * losses[0]
    for name, p in model.named_parameters():
        key = name.replace(".base.", ".")
        if key in base:
            assert torch.equal(p, base[key]), name
    for _, layer in lmoe_layers(model):
        assert layer.lora_A.dtype == torch.float32  # experts stay in float32 under autocast


def test_lmoe_train_on_one_gpu(tmp_path):
    from tiny import tiny_model_dir, train_config, write_jsonl

    from lmoe.training.loop import train
    from lmoe.training.metrics_log import read_metrics

    rows = [
        {"prompt": f"Repeat {w}.", "completion": w} for w in ("cat", "mat", "stone", "river")
    ] * 4
    setup = (tiny_model_dir(tmp_path / "model"), write_jsonl(tmp_path / "rows.jsonl", rows))
    result = train(train_config(setup, tmp_path / "run", precision="bf16"))
    metrics = read_metrics(tmp_path / "run")
    assert next(result.model.parameters()).device.type == "cuda"
    assert all(torch.isfinite(torch.tensor(r["loss"])) and r["tokens_per_s"] > 0 for r in metrics)
    assert metrics[-1]["loss"] < metrics[0]["loss"]
