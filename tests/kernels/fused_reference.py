"""Independent references for the fused kernels' tests: the plain formulas in float64 (autograd gives
their gradients, not the kernels' hand-written backward), and a tiny Llama's loss and gradients."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

import ftcore.models as M
from ftcore.distributed.parallelize import parallelize

# Tolerances against a float64 reference, per input dtype: a few units in the last place of the dtype.
TOLERANCES = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=3e-2, atol=3e-2)}


def rms_norm64(x, weight, eps):
    x = x.double()
    return weight.double() * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def swiglu64(gate, up):
    return F.silu(gate.double()) * up.double()


def rope64(x, cos, sin):
    x = x.double()
    first, second = x.chunk(2, dim=-1)
    return x * cos.double() + torch.cat((-second, first), dim=-1) * sin.double()


def grads64(formula, inputs, grad_out, *args):
    """float64 autograd gradients of formula(*inputs, *args) for the output gradient grad_out."""
    leaves = [t.detach().double().requires_grad_(True) for t in inputs]
    formula(*leaves, *args).backward(grad_out.double())
    return [leaf.grad for leaf in leaves]


def rope_tables(batch, seq_len, head_dim, dtype, seed=0):
    """(batch, 1, T, head_dim) cos / sin with equal halves, as RotaryEmbedding.cos_sin builds them."""
    angles = torch.randn(batch, 1, seq_len, head_dim // 2, generator=torch.Generator().manual_seed(seed)) * 3
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def tiny_models(lora: bool, device="cpu", dtype=torch.float32, seed=0, **sizes):
    """(plain, fused) copies of one random tiny Llama with random norm weights (and random LoRA B)."""
    torch.manual_seed(seed)
    if lora:
        attn = ["q_proj", "k_proj", "v_proj", "output_proj"]
        model = M.lora_tiny_llama(attn, apply_lora_to_mlp=True, **sizes)
    else:
        model = M.tiny_llama(**sizes)
    model.to(device=device, dtype=dtype)
    M.init_weights(model)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(1.0, 0.1)
            elif "lora_b" in name:
                param.normal_(0.0, 0.02)
    if lora:
        from ftcore.modules.lora import get_adapter_params, set_trainable_params

        set_trainable_params(model, get_adapter_params(model))
    return model, copy.deepcopy(model)


def loss_and_grads(model, tokens, input_pos=None):
    logits = model(tokens, input_pos=input_pos)
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


def compare_fused_model(
    lora: bool, activation_checkpointing: bool, device="cpu", dtype=torch.float32, **sizes
):
    """Loss and gradients of the plain and the fused model on one batch of packed-style positions."""
    plain, fused = tiny_models(lora, device, dtype, **sizes)
    parallelize(fused, fused_kernels=True, activation_checkpointing=activation_checkpointing)
    vocab = plain.tok_embeddings.num_embeddings
    tokens = torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(1)).to(device)
    # row 1 restarts its positions mid-sequence (packing), so the angles differ per batch row
    input_pos = torch.stack([torch.arange(24), torch.cat([torch.arange(10), torch.arange(14)])]).to(device)
    return loss_and_grads(plain, tokens, input_pos), loss_and_grads(fused, tokens, input_pos)
