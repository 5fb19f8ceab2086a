"""The LM head + cross-entropy of a causal LM in vocabulary chunks, with the tied weight's gradient in
one buffer (any optimizer) or none at all (Lomo): the memory of the head's part of a training step.

Owns `lm_loss(model, input_ids, ...)` (a whole HF causal LM's mean next-token loss) and
`head_loss(hidden, weight, targets, ...)` (the head alone). The plain twin of both is
`F.cross_entropy(F.linear(hidden, weight).float(), targets)`, i.e. `model(input_ids, labels=...).loss`;
tests/meft/lomo/test_head.py compares them, and Lomo / AdaLomo steps through either.

Why: in a plain step autograd holds, at the start of backward, the [N, V] logits, their log-softmax and
their gradient (3 x 48 MiB in fp32 for 256 tokens of a 49k vocabulary), then makes the head's full
[V, d] weight gradient; with tied embeddings that gradient waits through the whole backward for the
embedding's part, which autograd adds out of place at the end (head part + embedding part + sum: 3 x
108 MiB for SmolLM2-135M in fp32). Here:

  forward   logits are made `chunk_bytes` of fp32 at a time over the vocabulary; only the log-sum-exp
            [N] and the target logits are kept; the hidden states [N, d] are saved (as a Linear would).
  backward  each vocabulary chunk's logits are recomputed (one more head matmul), turned into their
            gradient and used at once: the hidden states' gradient (accumulated in fp32 over chunks) and
            the chunk's rows of the weight gradient. Those rows go
              - (any optimizer) into one [V, d] buffer: the gradient of an untied head; tied, the head's
                part is not made here but in the embedding's backward, at the end, when the activations
                are gone (the chunks' logits recomputed once more from the saved hidden states, log-sum-
                exp and targets; the weight has not changed), which then adds its own rows in place
                (summed per distinct token first, as the embedding's own backward does) and hands the
                whole gradient to autograd: one buffer, alive only at the end of backward, instead of
                one held through it plus two more at the end; the optimizer's hook sees one whole
                gradient (exact for AdaLomo, clipping, AdamW ...);
              - (Lomo, when `opt.rows_update_ok(weight)`) straight into Lomo's update of those rows,
                except, tied, the rows of tokens in `input_ids`, whose head part waits in a [U, d]
                buffer (U distinct input tokens) for the embedding's part: each row is updated once, with
                its whole gradient, so the result equals one fused update (Lomo's rule is elementwise).
                No [V, d] gradient exists. Rows are updated after the chunk's logits and the hidden
                states' gradient have read them, and the embedding's backward never reads the weight,
                so every value backward reads is the pre-update one.

Exactness: the same math as the plain twin in a different order (vocabulary chunks; log-sum-exp of
chunk log-sum-exps; the hidden states' gradient summed over chunks in fp32 where a bf16 matmul would
round once at the end), equal to fp32 rounding. Cost: one more head matmul than the plain twin (the
logits' recompute; tied one-buffer path: two). Limits: a plain `nn.Linear` head without bias, no logit
soft-capping or scaling, and, tied, a plain `nn.Embedding` lookup (padding_idx honoured; max_norm,
scale_grad_by_freq, sparse refused); no autocast (compute dtype = the weight's); no double backward;
Lomo with clip='tensor' / 'global', stochastic rounding or several ranks, and AdaLomo (whose update needs
the whole gradient's statistics) take the one-buffer path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["lm_loss", "lm_loss_supported", "head_loss", "IGNORE_INDEX", "HEAD_CHUNK_BYTES"]

IGNORE_INDEX = -100
HEAD_CHUNK_BYTES = 8 * 2**20  # fp32 bytes of one chunk's logits (and of a bf16 weight chunk's fp32 copy)


class _Plan:
    """One forward's state shared by the head's and the tied embedding's backward (a graph owns one)."""

    def __init__(self, weight: Tensor, opt, ids: Tensor | None, padding_idx: int | None = None):
        self.weight = weight  # [V, d]
        rows_ok = getattr(opt, "rows_update_ok", None)  # meft's fused optimizers; any other: one buffer
        self.opt = opt if rows_ok is not None and rows_ok(weight) else None  # None: the one-buffer path
        self.tied = ids is not None
        self.touched = self.inverse = None
        if self.tied:  # [U] sorted distinct token ids, [n] position of each input token in `touched`
            self.touched, self.inverse = torch.unique(ids.reshape(-1), return_inverse=True)
        # [n, 1] input tokens whose embedding gets no gradient (nn.Embedding's padding_idx), or None
        self.no_grad = None if padding_idx is None or not self.tied else (ids.reshape(-1, 1) == padding_idx)
        self.deferred: tuple | None = None  # one-buffer path, tied: what the head's weight gradient needs
        self.pending: Tensor | None = None  # Lomo path, tied: [U, d] the head's part of the touched rows
        self.begun = False  # Lomo path, tied: the head's backward opened the weight's update

    @torch.no_grad()
    def lomo_rows(self, start: int, grad_rows: Tensor) -> None:
        """Lomo path: the head's gradient of weight rows [start, start + c): update them now, keeping the
        rows the embedding will also touch for `embedding_grad`."""
        w = self.weight
        rows = w.narrow(0, start, grad_rows.shape[0])  # [c, d] view
        if not self.tied:
            self.opt.update_rows(w, rows, grad_rows)
            return
        if self.pending is None:
            self.pending = grad_rows.new_zeros((self.touched.numel(), w.shape[1]))  # [U, d]
        bounds = torch.tensor([start, start + grad_rows.shape[0]], device=self.touched.device)
        lo, hi = torch.searchsorted(self.touched, bounds).tolist()
        local = self.touched[lo:hi] - start  # [u] touched rows of this chunk
        self.pending[lo:hi] = grad_rows[local]
        keep = rows[local].clone()  # [u, d] the chunk is updated as a whole, these rows put back as they were
        self.opt.update_rows(w, rows, grad_rows)
        rows.index_copy_(0, local, keep)

    @torch.no_grad()
    def embedding_grad(self, grad_out: Tensor) -> Tensor | None:
        """The tied embedding's backward: add its part ([n, d] output gradient) to the head's; returns the
        weight gradient to hand to autograd (None on the Lomo path, which updates the touched rows here)."""
        w = self.weight
        # summed per distinct token in fp32, then added once: as embedding backward + autograd's sum do
        emb = torch.zeros((self.touched.numel(), w.shape[1]), dtype=torch.float32, device=w.device)  # [U, d]
        g_tokens = grad_out.reshape(-1, w.shape[1]).float()  # [n, d] (grad_out itself when fp32: not in place)
        if self.no_grad is not None:
            g_tokens = g_tokens.masked_fill(self.no_grad, 0.0)
        emb.index_add_(0, self.inverse, g_tokens)
        emb = emb.to(grad_out.dtype)
        if self.opt is None:
            deferred, self.deferred = self.deferred, None
            grad = torch.zeros_like(w) if deferred is None else _head_weight_grad(*deferred)  # [V, d]
            grad.index_add_(0, self.touched, emb)  # distinct indices: one add per row
            return grad
        pending, self.pending = self.pending, None
        if not self.begun:
            self.opt.begin_rows(w)
        g = emb if pending is None else pending.add_(emb)  # [U, d] whole gradient of the touched rows
        rows = w[self.touched]  # [U, d] copy
        self.opt.update_rows(w, rows, g)
        w.index_copy_(0, self.touched, rows)
        self.begun = False  # a next backward of the same graph (retain_graph) opens a new update
        return None


def _chunk_rows(n: int, d: int, v: int, chunk_bytes: int) -> int:
    return max(1, min(v, chunk_bytes // (4 * max(n, d, 1))))


def _logits_grad(hidden: Tensor, w_rows: Tensor, targets: Tensor, lse: Tensor, scale: Tensor,
                 start: int) -> Tensor:
    """[n, c] gradient of the loss w.r.t. the logits of vocabulary rows [start, start + c), recomputed from
    hidden [n, d], w_rows [c, d], the log-sum-exp [n] and d loss / d row loss `scale` [n]; as cross_entropy's
    backward (fp32), then cast to the weight's dtype, as the backward of the plain twin's upcast."""
    c = w_rows.shape[0]
    dz = F.linear(hidden, w_rows).float().sub_(lse[:, None]).exp_()  # [n, c] softmax
    at = ((targets >= start) & (targets < start + c)).nonzero().squeeze(1)  # [k] targets in this chunk
    dz[at, targets[at] - start] -= 1.0
    return dz.mul_(scale[:, None]).to(w_rows.dtype)


def _head_weight_grad(hidden: Tensor, weight: Tensor, targets: Tensor, lse: Tensor, scale: Tensor,
                      chunk: int) -> Tensor:
    """The head's [V, d] weight gradient, chunk by chunk (each chunk's logits recomputed)."""
    grad = torch.empty_like(weight)
    for start in range(0, weight.shape[0], chunk):
        w_rows = weight.narrow(0, start, min(chunk, weight.shape[0] - start))
        torch.mm(_logits_grad(hidden, w_rows, targets, lse, scale, start).t(), hidden,
                 out=grad.narrow(0, start, w_rows.shape[0]))
    return grad


class _HeadLoss(torch.autograd.Function):
    """Mean cross-entropy of `hidden @ weight.T` against `targets`, in vocabulary chunks (module docstring)."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, plan: _Plan, chunk: int) -> Tensor:
        n, v = hidden.shape[0], weight.shape[0]
        lse_parts = []  # [n] per chunk
        target_logit = torch.zeros(n, dtype=torch.float32, device=hidden.device)  # [n]
        for start in range(0, v, chunk):
            c = min(chunk, v - start)
            z = F.linear(hidden, weight.narrow(0, start, c)).float()  # [n, c]: the plain twin's logits, upcast
            lse_parts.append(torch.logsumexp(z, dim=1))
            at = ((targets >= start) & (targets < start + c)).nonzero().squeeze(1)  # [k] targets in this chunk
            target_logit.index_copy_(0, at, z[at, targets[at] - start])
        lse = torch.logsumexp(torch.stack(lse_parts), dim=0)  # [n]
        valid = targets != IGNORE_INDEX  # [n]
        loss = (lse - target_logit).masked_fill_(~valid, 0.0).sum() / valid.sum()
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.plan, ctx.chunk = plan, chunk
        return loss

    @staticmethod
    @torch.no_grad()
    def backward(ctx, grad_loss: Tensor):
        hidden, weight, targets, lse = ctx.saved_tensors
        plan, chunk = ctx.plan, ctx.chunk
        n, d, v = hidden.shape[0], hidden.shape[1], weight.shape[0]
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        valid = targets != IGNORE_INDEX
        scale = valid.float().mul_(grad_loss.float() / valid.sum())  # [n] d loss / d (row loss)
        grad_h32 = torch.zeros((n, d), dtype=torch.float32, device=hidden.device) if want_h else None  # [n, d]
        # one-buffer path: untied, the gradient is made here and handed over; tied, it would wait through
        # the whole backward for the embedding's part, so it is made there instead (recomputing the logits
        # once more), when the activations are gone: nothing [V, d] lives across the backward
        deferred = want_w and plan.opt is None and plan.tied
        grad_w = torch.empty_like(weight) if want_w and plan.opt is None and not deferred else None  # [V, d]
        if want_w and plan.opt is not None:  # one update per backward: a second one in the step is refused
            plan.opt.begin_rows(weight)
            plan.begun = plan.tied  # the tied embedding's backward closes it
        for start in range(0, v, chunk):
            w_rows = weight.narrow(0, start, min(chunk, v - start))  # [c, d]
            dz = _logits_grad(hidden, w_rows, targets, lse, scale, start)  # [n, c]
            if want_h:  # fp32 accumulation over chunks (a bf16 matmul rounds once, at its end)
                grad_h32.addmm_(dz.float(), w_rows.float())
            if grad_w is not None:
                torch.mm(dz.t(), hidden, out=grad_w.narrow(0, start, w_rows.shape[0]))  # [c, d]
            elif want_w and not deferred:
                plan.lomo_rows(start, torch.mm(dz.t(), hidden))  # after w_rows was read above
        if deferred:
            plan.deferred = (hidden, weight, targets, lse, scale, chunk)
        return (grad_h32.to(hidden.dtype) if want_h else None), grad_w, None, None, None


class _TiedEmbedding(torch.autograd.Function):
    """`F.embedding(ids, weight)` whose backward completes the tied head's gradient (`_Plan`) and does not
    read the weight."""

    @staticmethod
    def forward(ctx, weight: Tensor, ids: Tensor, plan: _Plan) -> Tensor:
        ctx.plan = plan
        return F.embedding(ids, weight)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        return ctx.plan.embedding_grad(grad_out), None, None


def head_loss(hidden: Tensor, weight: Tensor, targets: Tensor, *, opt=None,
              chunk_bytes: int = HEAD_CHUNK_BYTES) -> Tensor:
    """Mean cross-entropy of the logits `hidden @ weight.T` (hidden [N, d], weight [V, d]) against
    `targets` [N] (IGNORE_INDEX skipped), never holding [N, V] logits. With `opt` a meft.Lomo owning an
    (untied) `weight`, the head's rows are updated inside this loss's backward and no weight gradient is
    made; otherwise the gradient is one [V, d] tensor, as usual."""
    if hidden.dim() != 2 or weight.dim() != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError(f"head_loss wants hidden [N, d], weight [V, d], targets [N]; got "
                         f"{tuple(hidden.shape)}, {tuple(weight.shape)}, {tuple(targets.shape)}")
    plan = _Plan(weight, opt if weight.requires_grad else None, None)
    chunk = _chunk_rows(hidden.shape[0], hidden.shape[1], weight.shape[0], chunk_bytes)
    return _HeadLoss.apply(hidden, weight, targets, plan, chunk)


def _plain_head(model) -> nn.Linear:
    head = model.get_output_embeddings()
    cfg = model.config
    odd = [k for k in ("final_logit_softcapping", "logit_scale", "logits_scaling") if getattr(cfg, k, None)]
    if type(head) is not nn.Linear or head.bias is not None or odd:
        raise ValueError(f"lm_loss needs a plain bias-free nn.Linear LM head without logit scaling; this model "
                         f"has {type(head).__name__}{' with ' + ', '.join(odd) if odd else ''}: use "
                         "model(input_ids, labels=labels).loss")
    return head


def _plain_embedding(model) -> nn.Embedding:
    """The tied input embedding, which lm_loss replaces by `_TiedEmbedding`: it must be a plain lookup."""
    emb = model.get_input_embeddings()
    if type(emb) is not nn.Embedding or emb.max_norm is not None or emb.scale_grad_by_freq or emb.sparse:
        raise ValueError(f"lm_loss with tied embeddings needs a plain nn.Embedding (no max_norm, "
                         f"scale_grad_by_freq or sparse); this model has {type(emb).__name__}: use "
                         "model(input_ids, labels=labels).loss")
    return emb


def lm_loss_supported(model) -> bool:
    """Whether `lm_loss` takes this model (plain bias-free head without logit scaling; tied, a plain embedding)."""
    try:
        head = _plain_head(model)
        if head.weight is model.get_input_embeddings().weight:
            _plain_embedding(model)
    except (ValueError, AttributeError, NotImplementedError):
        return False
    return callable(getattr(model, "get_decoder", None))


def lm_loss(model, input_ids: Tensor, labels: Tensor | None = None, *, attention_mask: Tensor | None = None,
            position_ids: Tensor | None = None, opt=None, chunk_bytes: int = HEAD_CHUNK_BYTES) -> Tensor:
    """`model(input_ids, attention_mask=..., labels=labels).loss` of an HF causal LM (mean next-token
    cross-entropy, labels default to input_ids, IGNORE_INDEX skipped) with the head's memory of this
    module's docstring. input_ids / labels / attention_mask: [B, T] (or a 4-D mask and position_ids [B, T]:
    a packed batch, `meft.data.packed`). Pass the step's `opt` when it is a meft.Lomo, so that the head's
    (tied) rows are updated inside backward without a [V, d] gradient."""
    head = _plain_head(model)
    labels = input_ids if labels is None else labels
    w = head.weight  # [V, d]
    tied = w is model.get_input_embeddings().weight and w.requires_grad
    pad = _plain_embedding(model).padding_idx if tied else None
    plan = _Plan(w, opt if w.requires_grad else None, input_ids if tied else None, pad)
    if tied:
        out = model.get_decoder()(inputs_embeds=_TiedEmbedding.apply(w, input_ids, plan),
                                  attention_mask=attention_mask, position_ids=position_ids)
    else:
        out = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
    hidden = out.last_hidden_state[:, :-1].reshape(-1, w.shape[1])  # [B * (T-1), d]: position p predicts p+1
    targets = labels[:, 1:].reshape(-1)  # [B * (T-1)]
    keep = targets != IGNORE_INDEX
    if not bool(keep.all()):  # the head only where a label exists
        hidden, targets = hidden[keep], targets[keep]
    chunk = _chunk_rows(hidden.shape[0], hidden.shape[1], w.shape[0], chunk_bytes)
    return _HeadLoss.apply(hidden, w, targets, plan, chunk)
