"""A deliberately naive, loop-by-loop implementation of the CapsNet ops, independent of
``capsnet_ext.reference``: every product, softmax and sum is spelled out per sample, per
capsule pair, so the vectorised reference can be checked against it (in float64)."""
import torch


def naive_predict(u, W):
    B, I, _ = u.shape
    J = W.shape[1]
    rows = []
    for b in range(B):
        per_i = []
        for i in range(I):
            per_i.append(torch.stack([W[i, j] @ u[b, i] for j in range(J)]))
        rows.append(torch.stack(per_i))
    return torch.stack(rows)


def naive_squash(s):
    n2 = (s * s).sum()
    if not n2.detach().item():
        return s * 0
    return (n2 / (1 + n2)) * s / torch.sqrt(n2)


def naive_softmax(logits_row, leaky, temperature=1.0):
    exps = [torch.exp(x / temperature) for x in logits_row]
    total = sum(exps) + (1.0 if leaky else 0.0)  # exp(0) of the none-of-the-above logit
    return [e / total for e in exps]


def naive_routing(u_hat, iterations, bias=None, leaky=False, detach_inner=False, prior=None,
                  temperature=1.0):
    """Returns (v [B, J, D], c [B, I, J]) of the last iteration. ``prior [I, J]`` starts the
    logits (it is added before every softmax); ``temperature`` divides them."""
    B, I, J, D = u_hat.shape
    outs, couplings = [], []
    for b in range(B):
        logits = [[prior[i, j] if prior is not None else u_hat.new_zeros(()) for j in range(J)]
                  for i in range(I)]
        for r in range(iterations):
            last = r == iterations - 1
            src = u_hat[b].detach() if (detach_inner and not last) else u_hat[b]
            c = [naive_softmax(logits[i], leaky, temperature) for i in range(I)]
            if detach_inner and not last:
                c = [[x.detach() for x in row] for row in c]
            v = []
            for j in range(J):
                s = sum(c[i][j] * src[i, j] for i in range(I))
                if bias is not None:
                    s = s + (bias[j].detach() if (detach_inner and not last) else bias[j])
                v.append(naive_squash(s))
            if not last:
                agree_src = u_hat[b].detach() if detach_inner else u_hat[b]
                vv = [x.detach() for x in v] if detach_inner else v
                logits = [[logits[i][j] + torch.dot(agree_src[i, j], vv[j]) for j in range(J)]
                          for i in range(I)]
        outs.append(torch.stack(v))
        couplings.append(torch.stack([torch.stack(row) for row in c]))
    return torch.stack(outs), torch.stack(couplings)


def naive_margin_loss(lengths, target_sets, m_pos=0.9, m_neg=0.1, lam=0.5):
    """Per-sample margin loss with plain Python floats; target_sets[b] is a set of classes."""
    out = []
    for b, row in enumerate(lengths.tolist()):
        total = 0.0
        for k, length in enumerate(row):
            if k in target_sets[b]:
                total += max(0.0, m_pos - length) ** 2
            else:
                total += lam * max(0.0, length - m_neg) ** 2
        out.append(total)
    return out
