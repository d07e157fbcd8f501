"""Export a timm ViT's self-attention as ONNX Runtime's fused ``com.microsoft.Attention`` operator.

Traced as-is, each attention block becomes a dozen ONNX nodes (the qkv MatMul, reshapes, transposes,
two batched MatMuls, a softmax); ONNX Runtime's transformer optimizer does not recognise timm's pattern,
so the products stay unfused fp32. Exported as one ``Attention`` node instead, ONNX Runtime runs its own
multi-head attention kernel, and dynamic quantization turns the node into ``QAttention`` (the qkv
projection in INT8). On a 2-core CPU this makes the INT8 ViT-Ti 1.05-1.25x faster (measured side by side
with ``benchmarks/student_vs_teacher.sh``). The cost: the graph needs ONNX Runtime (contrib operators),
so ``medvision export --portable`` keeps standard ONNX operators only.

The replacement computes exactly what timm computes in torch (same packed qkv weights, same scale),
and the export's parity check compares ONNX Runtime against the original, unreplaced model.
"""

from __future__ import annotations

import copy

import torch

DOMAIN = "com.microsoft"


class _AttentionOp(torch.autograd.Function):
    """Multi-head self-attention with packed qkv weights ``w`` (in, 3 * hidden): torch forward, ORT symbolic."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, num_heads: int) -> torch.Tensor:
        batch, tokens, _ = x.shape
        q, k, v = (x @ w + b).reshape(batch, tokens, 3, num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return out.transpose(1, 2).reshape(batch, tokens, -1)

    @staticmethod
    def symbolic(g, x, w, b, num_heads: int):
        out = g.op(f"{DOMAIN}::Attention", x, w, b, num_heads_i=num_heads)
        out.setType(x.type())  # (batch, tokens, hidden): FusedAttention is only used where hidden == the input width
        return out


class FusedAttention(torch.nn.Module):
    """Drop-in for a plain timm ``Attention`` block (no q/k norm, no gate), sharing its weights."""

    def __init__(self, attn: torch.nn.Module) -> None:
        super().__init__()
        self.attn = attn

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("the fused attention export has no mask: ViT self-attention does not use one")
        a = self.attn
        bias = a.qkv.bias if a.qkv.bias is not None else torch.zeros(a.qkv.out_features)
        return a.proj(_AttentionOp.apply(x, a.qkv.weight.t(), bias, a.num_heads))


def fusable(module: torch.nn.Module) -> bool:
    """A timm ``Attention`` exactly equal to packed-qkv scaled-dot-product attention followed by ``proj``."""
    from timm.models.vision_transformer import Attention

    return (type(module) is Attention
            and all(isinstance(getattr(module, n, torch.nn.Identity()), torch.nn.Identity) for n in ("q_norm", "k_norm", "norm"))
            and getattr(module, "gate", None) is None
            and module.qkv.out_features == 3 * module.num_heads * module.head_dim == 3 * module.qkv.in_features
            and abs(module.scale - module.head_dim ** -0.5) < 1e-12)


def with_fused_attention(model: torch.nn.Module) -> tuple[torch.nn.Module, int]:
    """A copy of ``model`` whose fusable attention blocks export as ``com.microsoft.Attention``, and how many."""
    fused = copy.deepcopy(model).eval()
    count = 0
    for parent in list(fused.modules()):
        for name, child in list(parent.named_children()):
            if fusable(child):
                setattr(parent, name, FusedAttention(child))
                count += 1
    return fused, count


def uses_contrib_ops(proto) -> bool:
    """Whether an ONNX graph needs ONNX Runtime's contrib operators."""
    return any(n.domain == DOMAIN for n in proto.graph.node)
