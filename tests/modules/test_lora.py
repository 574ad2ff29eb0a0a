"""LoRALinear against HF PEFT's LoRA/DoRA layer (an independent implementation), plus the helpers."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ftcore.modules.lora import (
    LoRALinear,
    _add_scaled_product,
    disable_adapters,
    get_adapter_params,
    get_merged_state_dict,
    merge_lora_weights,
    set_trainable_params,
    unmerge_lora_weights,
)

IN, OUT, RANK, ALPHA = 12, 10, 4, 8.0


class OneLayer(nn.Module):
    def __init__(self, bias: bool):
        super().__init__()
        self.proj = nn.Linear(IN, OUT, bias=bias)

    def forward(self, x):
        return self.proj(x)


def make_pair(use_dora: bool, bias: bool, seed: int = 0):
    """Our LoRALinear and a PEFT-wrapped nn.Linear holding identical, non-trivial weights."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(seed)
    base = OneLayer(bias)
    ours = LoRALinear(IN, OUT, RANK, ALPHA, use_bias=bias, use_dora=use_dora)
    with torch.no_grad():
        ours.weight.copy_(base.proj.weight)
        if bias:
            ours.bias.copy_(base.proj.bias)
        ours.lora_b.weight.normal_()  # non-zero B so the adapter path matters
    config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["proj"], use_dora=use_dora)
    theirs = peft.get_peft_model(base, config)
    layer = theirs.base_model.model.proj
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(ours.lora_a.weight)
        layer.lora_B["default"].weight.copy_(ours.lora_b.weight)
        if use_dora:
            ours.magnitude.uniform_(0.5, 2.0)
            layer.lora_magnitude_vector["default"].weight.copy_(ours.magnitude)
    return ours, theirs, layer


@pytest.mark.parametrize("use_dora", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_forward_and_grads_match_peft(use_dora, bias):
    ours, theirs, layer = make_pair(use_dora, bias)
    x = torch.randn(3, 5, IN)
    out_ours, out_theirs = ours(x), theirs(x)
    torch.testing.assert_close(out_ours, out_theirs, atol=1e-5, rtol=1e-5)
    grad_out = torch.randn_like(out_ours)
    out_ours.backward(grad_out)
    out_theirs.backward(grad_out)
    torch.testing.assert_close(
        ours.lora_a.weight.grad, layer.lora_A["default"].weight.grad, atol=1e-5, rtol=1e-4
    )
    torch.testing.assert_close(
        ours.lora_b.weight.grad, layer.lora_B["default"].weight.grad, atol=1e-5, rtol=1e-4
    )
    if use_dora:
        torch.testing.assert_close(
            ours.magnitude.grad, layer.lora_magnitude_vector["default"].weight.grad, atol=1e-5, rtol=1e-4
        )
    assert ours.weight.grad is None  # the base stays frozen


def test_scaled_adapter_add_matches_the_formula_in_float64():
    # the layer takes its one-node training path (lora_matmul); the helper's in-place addmm (no grad) and
    # its plain fallback (a non-contiguous output) agree
    torch.manual_seed(0)
    layer = LoRALinear(IN, OUT, RANK, ALPHA)
    nn.init.normal_(layer.lora_b.weight)
    x = torch.randn(3, 5, IN, requires_grad=True)
    a, b = layer.lora_a.weight.double(), layer.lora_b.weight.double()
    expected = x.double() @ layer.weight.double().T + (ALPHA / RANK) * (x.double() @ a.T @ b.T)
    out = layer(x)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    out.square().sum().backward()
    x64 = x.detach().double().requires_grad_(True)
    (x64 @ layer.weight.double().T + (ALPHA / RANK) * (x64 @ a.T @ b.T)).square().sum().backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(layer(x).double(), expected, rtol=1e-5, atol=1e-5)
    base, hidden = torch.randn(OUT, 7).T, torch.randn(7, RANK)  # base (7, OUT) is a transposed view
    fallback = _add_scaled_product(base, hidden, layer.lora_b.weight.detach(), 0.5)
    torch.testing.assert_close(fallback, base + 0.5 * hidden @ layer.lora_b.weight.detach().T)


def test_init_follows_the_paper():
    torch.manual_seed(0)
    layer = LoRALinear(256, 64, rank=8, alpha=16)
    assert torch.count_nonzero(layer.lora_b.weight) == 0
    # Kaiming-uniform with a=sqrt(5): U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = in_dim.
    bound = 1 / math.sqrt(256)
    assert layer.lora_a.weight.abs().max() <= bound
    assert layer.lora_a.weight.abs().max() > 0.9 * bound
    x = torch.randn(2, 256)
    torch.testing.assert_close(layer(x), x @ layer.weight.T)  # B = 0: adapted == base at step 0
    assert layer.scaling == 2.0


def test_dora_magnitude_starts_at_row_norm_of_base():
    torch.manual_seed(0)
    layer = LoRALinear(IN, OUT, RANK, ALPHA, use_dora=True)
    with torch.no_grad():
        layer.weight.normal_()
    layer.initialize_dora_magnitude()
    expected = torch.sqrt((layer.weight**2).sum(dim=1))
    torch.testing.assert_close(layer.magnitude.detach(), expected)
    x = torch.randn(4, IN)
    torch.testing.assert_close(layer(x), x @ layer.weight.T)


class Tiny(nn.Module):
    def __init__(self, use_dora=False):
        super().__init__()
        self.q = LoRALinear(IN, OUT, RANK, ALPHA, use_bias=True, use_dora=use_dora)
        self.norm = nn.LayerNorm(OUT)
        self.out = nn.Linear(OUT, 3)

    def forward(self, x):
        return self.out(self.norm(self.q(x)))


def randomize_adapters(model):
    with torch.no_grad():
        for param in get_adapter_params(model).values():
            param.normal_()


@pytest.mark.parametrize("use_dora", [False, True])
def test_merge_unmerge_round_trip(use_dora):
    torch.manual_seed(0)
    model = Tiny(use_dora)
    randomize_adapters(model)
    x = torch.randn(6, IN)
    before, base_before = model(x), model.q.weight.detach().clone()
    merge_lora_weights(model)
    assert model.q.merged
    torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-5)
    # The merged layer is exactly an nn.Linear with the merged weight.
    plain = x @ model.q.weight.T + model.q.bias
    torch.testing.assert_close(model.q(x), plain)
    unmerge_lora_weights(model)
    torch.testing.assert_close(model.q.weight, base_before, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-5)


def test_disable_adapters_gives_base_output():
    torch.manual_seed(0)
    model = Tiny(use_dora=True)
    randomize_adapters(model)
    x = torch.randn(6, IN)
    adapted = model(x)
    base = model.out(model.norm(x @ model.q.weight.T + model.q.bias))
    with disable_adapters(model):
        torch.testing.assert_close(model(x), base)
    torch.testing.assert_close(model(x), adapted)


def test_adapter_params_and_trainable_set():
    model = Tiny(use_dora=True)
    names = set(get_adapter_params(model))
    assert names == {"q.lora_a.weight", "q.lora_b.weight", "q.magnitude"}
    set_trainable_params(model, get_adapter_params(model))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == names
    with pytest.raises(ValueError, match="not parameters"):
        set_trainable_params(model, ["q.lora_c.weight"])


def test_state_dict_keys_and_merged_export():
    torch.manual_seed(0)
    model = Tiny(use_dora=True)
    randomize_adapters(model)
    assert set(model.state_dict()) >= {
        "q.weight",
        "q.bias",
        "q.lora_a.weight",
        "q.lora_b.weight",
        "q.magnitude",
    }
    merged = get_merged_state_dict(model)
    assert set(merged) == {"q.weight", "q.bias", "norm.weight", "norm.bias", "out.weight", "out.bias"}
    # Loading the merged dict into the same architecture built with plain Linear layers reproduces it.
    plain = nn.Sequential()
    plain.q, plain.norm, plain.out = nn.Linear(IN, OUT), nn.LayerNorm(OUT), nn.Linear(OUT, 3)
    plain.load_state_dict(merged)
    x = torch.randn(5, IN)
    torch.testing.assert_close(plain(x), model(x), atol=1e-5, rtol=1e-5)
    assert not model.q.merged  # export does not touch the model


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="rank"):
        LoRALinear(8, 8, rank=0, alpha=1)
    with pytest.raises(ValueError, match="dropout"):
        LoRALinear(8, 8, rank=2, alpha=1, dropout=1.5)
    with pytest.raises(ValueError, match="use_dora"):
        LoRALinear(8, 8, rank=2, alpha=1).initialize_dora_magnitude()


def test_dropout_applies_only_to_the_adapter_path():
    torch.manual_seed(0)
    layer = LoRALinear(IN, OUT, RANK, ALPHA, dropout=0.5)
    x = torch.randn(64, IN)
    layer.train()
    torch.testing.assert_close(layer(x), x @ layer.weight.T)  # B = 0: dropout cannot change output
    with torch.no_grad():
        layer.lora_b.weight.normal_()
    assert not torch.allclose(layer(x), layer(x))  # training: random masks differ
    layer.eval()
    torch.testing.assert_close(layer(x), layer(x))


def test_qlora_base_loads_float_weight_and_keeps_key_names():
    torch.manual_seed(0)
    in_dim, out_dim = 128, 64  # NF4 needs in_dim divisible by its block size of 64
    float_layer = LoRALinear(in_dim, out_dim, RANK, ALPHA, use_bias=True)
    with torch.no_grad():
        float_layer.lora_b.weight.normal_()
        float_layer.bias.normal_()
    qlora = LoRALinear(in_dim, out_dim, RANK, ALPHA, use_bias=True, quantize_base=True)
    qlora.load_state_dict(float_layer.state_dict())
    keys = set(qlora.state_dict())
    assert keys == {"weight", "bias", "lora_a.weight", "lora_b.weight"}
    saved_weight = qlora.state_dict()["weight"]
    assert saved_weight.dtype == torch.bfloat16 and saved_weight.shape == (out_dim, in_dim)
    # NF4 is lossy: the stored base is close to the float one (4-bit, blockwise absmax)...
    rel_err = (saved_weight.float() - float_layer.weight).norm() / float_layer.weight.norm()
    assert 0 < rel_err < 0.15
    # ...and forward is exactly the LoRA formula over that dequantized base.
    x = torch.randn(3, in_dim)
    base = qlora.nf4_base.weight_nf4.dequantize(torch.float32)  # nf4_linear dequantizes to x's dtype
    torch.testing.assert_close(base.bfloat16(), saved_weight)
    expected = x @ base.T + ALPHA / RANK * (x @ qlora.lora_a.weight.T @ qlora.lora_b.weight.T)
    out = qlora(x) - qlora.bias
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
    out.sum().backward()
    assert qlora.lora_a.weight.grad is not None and qlora.lora_b.weight.grad is not None
    with pytest.raises(ValueError, match="get_merged_state_dict"):
        qlora.merge()
    merged = get_merged_state_dict(qlora)
    assert set(merged) == {"weight", "bias"}
    torch.testing.assert_close(merged["weight"].float(), qlora.merged_weight().float())


def _ops_in_backward(out: torch.Tensor) -> list[tuple[str, tuple[int, ...]]]:
    """(aten op, output shape) of every op the backward of `out.sum()` runs."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            result = func(*args, **(kwargs or {}))
            shape = tuple(result.shape) if isinstance(result, torch.Tensor) else ()
            self.ops.append((str(func.overloadpacket.__name__), shape))
            return result

    with Record() as record:
        out.sum().backward()
    return record.ops


@pytest.mark.parametrize("quantize_base", [False, True], ids=["lora", "qlora"])
def test_training_input_gradient_is_one_gemm_and_matches_the_formula(quantize_base):
    # Reference: autograd through the formula, on the base weight as the layer sees it (dequantized NF4).
    torch.manual_seed(0)
    layer = LoRALinear(128, 64, RANK, ALPHA, quantize_base=quantize_base)
    if quantize_base:
        layer.load_state_dict({"weight": torch.randn(64, 128) * 0.1}, strict=False)
    nn.init.normal_(layer.lora_b.weight)
    x = torch.randn(2, 7, 128, requires_grad=True)
    out = layer(x)
    ops = _ops_in_backward(out)
    # autograd would sum the base's and the adapter's input gradients with one add over (tokens, in)
    assert not [op for op, shape in ops if op in ("add", "add_") and shape == (14, 128)], ops
    assert ("addmm_", (14, 128)) in ops
    w = (layer.nf4_base.weight_nf4.dequantize(torch.float32) if quantize_base else layer.weight).double()
    a, b = layer.lora_a.weight.detach().double(), layer.lora_b.weight.detach().double()
    x64 = x.detach().double().requires_grad_(True)
    a64, b64 = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
    expected = x64 @ w.T + (ALPHA / RANK) * (x64 @ a64.T @ b64.T)
    expected.sum().backward()
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.lora_a.weight.grad.double(), a64.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.lora_b.weight.grad.double(), b64.grad, rtol=1e-5, atol=1e-5)


def test_adapters_train_in_bf16_when_the_input_needs_no_gradient():
    torch.manual_seed(0)
    layer = LoRALinear(128, 64, RANK, ALPHA).to(torch.bfloat16)
    nn.init.normal_(layer.lora_b.weight)
    x = torch.randn(3, 128, dtype=torch.bfloat16)  # the first block's input: frozen embeddings
    layer(x).float().square().sum().backward()
    grads_bf16 = [layer.lora_a.weight.grad.float(), layer.lora_b.weight.grad.float()]
    layer32 = LoRALinear(128, 64, RANK, ALPHA)
    layer32.load_state_dict({k: v.float() for k, v in layer.state_dict().items()})
    layer32(x.float()).square().sum().backward()
    for ours, reference in zip(grads_bf16, [layer32.lora_a.weight.grad, layer32.lora_b.weight.grad]):
        torch.testing.assert_close(ours, reference, rtol=0.05, atol=0.05 * reference.abs().max().item())


@pytest.mark.parametrize("nf4_path", [None, "gemv"], ids=["float-base", "nf4-gemv-path"])
def test_the_in_place_adapter_add_trains_like_the_formula(monkeypatch, nf4_path):
    # With dropout (here inactive: eval mode) the layer keeps separate ops and adds the adapter's product
    # into the base output in place. The NF4 base's GEMV/fused paths returned a view, which autograd
    # forbids modifying in place; a stand-in GEMV (the dequantized matmul) takes that path on CPU.
    from types import SimpleNamespace

    from ftcore import kernels
    from ftcore.kernels import nf4_reference as ref

    if nf4_path:
        dequant = lambda parts: ref.dequantize_nf4(parts, torch.float32)  # noqa: E731
        gemv = SimpleNamespace(nf4_gemv=lambda x, parts, bias: x @ dequant(parts).T)
        monkeypatch.setattr(kernels, "nf4_gemv_triton", gemv)
        monkeypatch.setattr(kernels, "nf4_matmul_path", lambda *args, **kwargs: nf4_path)
    torch.manual_seed(0)
    layer = LoRALinear(128, 64, RANK, ALPHA, dropout=0.1, quantize_base=nf4_path is not None).eval()
    nn.init.normal_(layer.lora_b.weight)
    x = torch.randn(2, 3, 128, requires_grad=True)
    layer(x).square().sum().backward()
    w = layer.nf4_base.weight_nf4.dequantize(torch.float32) if nf4_path else layer.weight.detach()
    a64, b64 = (t.detach().double().requires_grad_(True) for t in (layer.lora_a.weight, layer.lora_b.weight))
    x64 = x.detach().double().requires_grad_(True)
    (x64 @ w.double().T + (ALPHA / RANK) * (x64 @ a64.T @ b64.T)).square().sum().backward()
    for ours, reference in [
        (x.grad, x64.grad),
        (layer.lora_a.weight.grad, a64.grad),
        (layer.lora_b.weight.grad, b64.grad),
    ]:
        # fp32 against float64 sums of squares of O(10) outputs
        atol = 1e-5 * reference.abs().max().item()
        torch.testing.assert_close(ours.double(), reference, rtol=1e-4, atol=atol)


def test_dora_saves_no_weight_sized_tensor_for_its_detached_norm():
    """The norm is a constant in backprop: computed without a graph, nothing (out, in)-sized is saved
    for a backward that never runs (ac_offload_blocks would copy it to host memory every step)."""
    layer = LoRALinear(IN, OUT, RANK, ALPHA, use_dora=True)
    saved = []

    def record(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(record, lambda tensor: tensor):
        layer(torch.randn(3, IN)).sum().backward()
    weight_sized = [t for t in saved if t.shape == (OUT, IN) and t.untyped_storage().data_ptr()
                    != layer.weight.untyped_storage().data_ptr()]  # fmt: skip
    assert weight_sized == []
    assert layer.magnitude.grad is not None and layer.lora_a.weight.grad is not None
