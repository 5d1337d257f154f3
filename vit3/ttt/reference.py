"""Reference TTT inner loop: the inner gradient comes from autograd.

Covers the paper's whole design space (inner model, inner loss, lr, steps,
mini-batch size, gradient normalisation). It is the ground truth the closed-form
fast path (fast.py) is tested against, and it is slow and memory-hungry on
purpose: nothing here is fused or recomputed.

Samples and heads do not share inner weights after the first step, so the
weights are expanded to one copy per sample ([B, ...]); the per-(sample, head)
losses are summed into one scalar, whose gradient with respect to the expanded
weights is then exactly each sample's and head's own gradient. With
create_graph=True the second-order terms stay in the graph, so the outer loop
trains through the inner step.
"""
import torch
import torch.nn.functional as F

HEAD_MODELS = ("linear", "mlp", "silu_linear", "swiglu")


def head_model(kind: str, x: torch.Tensor, ws: list[torch.Tensor]) -> torch.Tensor:
    """Per-head inner model. x: [B, H, n, d], ws: per-sample weights [B, H, d_in, d_out]."""
    if kind == "linear":
        return x @ ws[0]
    if kind == "silu_linear":
        return F.silu(x @ ws[0])
    if kind == "swiglu":  # simplified SwiGLU: no output layer
        return (x @ ws[0]) * F.silu(x @ ws[1])
    if kind == "mlp":
        return F.gelu(x @ ws[0]) @ ws[1]
    raise ValueError(f"unknown head inner model {kind!r}")


def conv_model(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Per-sample 3x3 depthwise conv, zero padding. x: [B, c, h, w], w: [B, c, 3, 3]."""
    b, c, hh, ww = x.shape
    out = F.conv2d(x.reshape(1, b * c, hh, ww), w.reshape(b * c, 1, 3, 3), padding=1, groups=b * c)
    return out.view(b, c, hh, ww)


def token_loss(kind: str, pred: torch.Tensor, target: torch.Tensor, dim: int) -> torch.Tensor:
    """Inner loss per token, summed over the feature dimension `dim`."""
    if kind == "dot":
        return -(pred * target).sum(dim)
    if kind == "mse":
        return 0.5 * (pred - target).square().sum(dim)
    if kind == "l1":
        return (pred - target).abs().sum(dim)
    raise ValueError(f"unknown inner loss {kind!r}")


def normalize(g: torch.Tensor, dims) -> torch.Tensor:
    """g / (||g|| + 1), the norm taken over `dims` (for stability, as the paper does)."""
    return g / (g.norm(dim=dims, keepdim=True) + 1.0)


def ttt_reference(
    q1, k1, v1, q2, k2, v2, head_ws, conv_w, *, h, w,
    head_kind, loss, scale, lr, steps, batch, grad_norm,
):
    """Inner training on (k, v), then the trained inner models applied to q.

    q1/k1/v1: [B, N, H, d] or None (head branch), q2/k2/v2: [B, N, c] or None (conv branch,
    tokens in raster order of an h x w map), head_ws: list of [1, H, d_in, d_out],
    conv_w: [c, 1, 3, 3] or None. batch: tokens per inner mini-batch (None = all N).
    Returns [B, N, H*d + c]: the head outputs then the conv outputs.
    """
    if torch.is_inference_mode_enabled():
        raise RuntimeError("the reference TTT path needs autograd for its inner step: run it under "
                           "torch.no_grad() instead of torch.inference_mode(), or use impl='fast'")
    create_graph = torch.is_grad_enabled()
    use_head, use_conv = q1 is not None, q2 is not None
    ref = q1 if use_head else q2
    b, n = ref.shape[:2]

    if use_head:  # [B, N, H, d] -> [B, H, N, d]
        q1, k1, v1 = (t.transpose(1, 2) for t in (q1, k1, v1))
    if use_conv:  # [B, N, c] -> [B, c, h, w]
        q2, k2, v2 = (t.transpose(1, 2).reshape(b, -1, h, w) for t in (q2, k2, v2))
    ws = [x.expand(b, *x.shape[1:]) for x in head_ws] if use_head else []
    if use_conv:
        ws.append(conv_w.squeeze(1).expand(b, *conv_w.shape[:1], 3, 3))  # [B, c, 3, 3]

    batch = batch or n
    chunks = [slice(s, min(s + batch, n)) for s in range(0, n, batch)]
    for _ in range(steps):
        for chunk in chunks:
            with torch.enable_grad():
                # under no_grad (or with frozen weights) the inner step still needs a graph of its own
                ws = [x if create_graph and x.requires_grad else x.detach().requires_grad_() for x in ws]
                inner_loss = 0.0
                if use_head:
                    pred = head_model(head_kind, k1[:, :, chunk], ws[: len(head_ws)])  # [B, H, n_c, d]
                    inner_loss = token_loss(loss, pred, v1[:, :, chunk], dim=-1).mean(-1).sum()
                if use_conv:
                    pred = conv_model(k2, ws[-1]).flatten(2)[..., chunk, None]  # [B, c, n_c, 1]
                    target = v2.flatten(2)[..., chunk, None]
                    inner_loss = inner_loss + token_loss(loss, pred, target, dim=-1).mean(-1).sum()
                grads = torch.autograd.grad(scale * inner_loss, ws, create_graph=create_graph)
            if grad_norm:
                grads = [normalize(g, dims=(-2, -1) if use_conv and i == len(ws) - 1 else -2)
                         for i, g in enumerate(grads)]
            ws = [x - lr * g for x, g in zip(ws, grads)]

    outs = []
    if use_head:
        outs.append(head_model(head_kind, q1, ws[: len(head_ws)]).transpose(1, 2).reshape(b, n, -1))
    if use_conv:
        outs.append(conv_model(q2, ws[-1]).flatten(2).transpose(1, 2))
    return torch.cat(outs, dim=-1)
