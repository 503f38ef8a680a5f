"""The pure-PyTorch reference of every op: SPEC part 1 written as code.

Readable first: every other backend is tested against these functions. Inputs are assumed
validated by the public API in udafast.ops.
"""
import math

import torch
import torch.nn.functional as F

_LOG_ONEHOT_FLOOR = math.log(1e-4)


def class_thresholds(conf, pred, num_classes, portion, ignore_index=255):
    conf = conf.reshape(-1)
    pred = pred.reshape(-1)
    thresholds = torch.ones(num_classes, dtype=conf.dtype, device=conf.device)
    for c in range(num_classes):
        if c == ignore_index:
            continue
        values = conf[pred == c]
        n = math.floor(values.numel() * portion)  # float64, as SPEC 1.1 says
        if n >= 1:
            thresholds[c] = torch.sort(values, descending=True).values[n - 1]
    return thresholds


def confidence_bins(conf, bins):
    """Bin of each confidence: min(floor(x * bins), bins - 1), exact since bins is a power of two."""
    return torch.clamp(torch.floor(conf * bins), max=bins - 1).to(torch.int64)


def class_histogram_add_(counts, conf, pred, ignore_index=255):
    num_classes, bins = counts.shape
    conf = conf.reshape(-1)
    pred = pred.reshape(-1).to(torch.int64)
    keep = (pred != ignore_index) & (pred >= 0) & (pred < num_classes)
    flat = pred[keep] * bins + confidence_bins(conf[keep], bins)
    counts.view(-1).add_(torch.bincount(flat, minlength=num_classes * bins))
    return counts


def thresholds_from_histogram(counts, portion):
    """Lower edge of the bin holding each class's exact threshold; 1.0 where n < 1."""
    num_classes, bins = counts.shape
    thresholds = torch.ones(num_classes, dtype=torch.float32, device=counts.device)
    for c in range(num_classes):
        total = int(counts[c].sum())
        n = math.floor(total * portion)
        if n >= 1:
            from_top = torch.cumsum(counts[c].flip(0), 0)  # pixels in bins >= bins-1-i
            j = bins - 1 - int(torch.searchsorted(from_top, n))
            thresholds[c] = j / bins
    return thresholds


def cbst_pseudo_labels(probs, thresholds, ignore_index=255):
    ratio = probs / thresholds.detach().to(probs.dtype).view(1, -1, 1, 1)
    best = ratio.amax(dim=1)
    labels = torch.argmax(ratio, dim=1)  # documented to return the first maximum
    return torch.where(best < 1, torch.full_like(labels, ignore_index), labels)


def topk_per_class(scores, labels, num_classes, k, ignore_index=255):
    index = torch.full((num_classes, k), -1, dtype=torch.int64, device=scores.device)
    count = torch.zeros(num_classes, dtype=torch.int64, device=scores.device)
    for c in range(num_classes):
        if c == ignore_index:
            continue
        positions = torch.nonzero(labels == c).reshape(-1)
        # a stable descending sort keeps equal scores (and -0.0 beside +0.0) in position order
        order = torch.sort(scores[positions], descending=True, stable=True).indices
        chosen = positions[order[:k]]
        index[c, : chosen.numel()] = chosen
        count[c] = chosen.numel()
    return index, count


def prototype_distances(features, prototypes):
    """Plain L2 distance of every pixel to every prototype, from the difference f - p: [B, C, H, W]."""
    diff = features.unsqueeze(1) - prototypes.detach().to(features.dtype)[None, :, :, None, None]
    return torch.linalg.vector_norm(diff, dim=2)


def prototype_softmax(features, prototypes, tau=1.0, log=False):
    logits = -prototype_distances(features, prototypes) / tau
    return F.log_softmax(logits, dim=1) if log else F.softmax(logits, dim=1)


def prototype_rectify(features, prototypes, soft_labels, tau=1.0):
    weights = prototype_softmax(features, prototypes, tau)
    return torch.argmax(weights * soft_labels.detach(), dim=1)


def class_feature_sums(features, labels, num_classes, ignore_index=255):
    batch, dim = features.shape[:2]
    onehot = torch.zeros(batch, num_classes, *labels.shape[1:], dtype=features.dtype, device=features.device)
    labels = labels.to(torch.int64)
    valid = (labels != ignore_index) & (labels >= 0) & (labels < num_classes)
    onehot.scatter_(1, torch.where(valid, labels, 0).unsqueeze(1), valid.unsqueeze(1).to(features.dtype))
    sums = torch.einsum("bchw,bdhw->bcd", onehot, features)
    counts = onehot.sum(dim=(2, 3)).round().to(torch.int64)
    return sums, counts


def sce_loss(logits, target, alpha=0.1, beta=1.0, reg_weight=0.0, ignore_index=255):
    log_p = F.log_softmax(logits, dim=1)
    p = log_p.exp()
    valid = target != ignore_index
    n = valid.sum()
    safe_target = torch.where(valid, target, 0).to(torch.int64)
    onehot = F.one_hot(safe_target, logits.shape[1]).permute(0, 3, 1, 2).to(logits.dtype)
    # -log p_y written as softplus(logsumexp_{k != y}(z_k - z_y)): the same value, but its gradient
    # -(1 - p_y) = -sigmoid(...) does not cancel to 0 where p_y rounds to 1
    z_y = (logits * onehot).sum(dim=1, keepdim=True)
    others = (logits - z_y).masked_fill(onehot.bool(), torch.finfo(logits.dtype).min)
    ce_pixel = F.softplus(torch.logsumexp(others, dim=1))
    rce_pixel = -(torch.clamp(p, 1e-7, 1.0) * torch.log(torch.clamp(onehot, 1e-4, 1.0))).sum(dim=1)
    denominator = torch.clamp(n, min=1).to(logits.dtype)  # n == 0: both sums are 0, so is the term
    ce = torch.where(valid, ce_pixel, 0).sum() / denominator
    rce = torch.where(valid, rce_pixel, 0).sum() / denominator
    reg = -log_p.sum() / max(log_p.numel(), 1)  # REG over no element is 0, not NaN
    return alpha * ce + beta * rce + reg_weight * reg


def _log_softmax_log1p(logits):
    """log_softmax over dim 1, written as (z - m) - log1p(others): m the pixel's maximum logit,
    taken at its first argmax, and others = the sum of exp(z_k - m) over the other classes (ties
    of the maximum included).

    F.log_softmax forms log(sum exp(z - m)) = log(1 + others), which loses the relative accuracy of
    `others` once it is small (a confident pixel; all of it once others < 1e-16 in float64), while
    the KL of a target on the top class is about `others`. The argmax class's own z - m is the
    constant 0, so autograd routes the gradient of m to that class alone: its derivative is summed
    from the other classes instead of formed as q - 1, which would cancel in the same way."""
    if logits.shape[1] == 0:
        return logits  # no class: nothing to normalise (argmax needs one)
    top = logits.argmax(dim=1, keepdim=True)
    m = logits.gather(1, top)
    is_top = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, top, True)
    d = torch.where(is_top, 0, logits - m)
    others = torch.where(is_top, 0, d.exp()).sum(dim=1, keepdim=True)
    return d - torch.log1p(others)


def kl_loss(logits, target_probs, valid_mask=None):
    t = target_probs.detach().to(logits.dtype)
    log_q = _log_softmax_log1p(logits)  # log_softmax(logits, dim=1), accurate at any confidence
    pixel = (torch.xlogy(t, t) - t * log_q).sum(dim=1)
    if valid_mask is None:
        valid_mask = torch.ones_like(pixel, dtype=torch.bool)
    n = valid_mask.sum()
    denominator = (torch.clamp(n, min=1) * logits.shape[1]).to(logits.dtype)
    return torch.where(valid_mask, pixel, 0).sum() / denominator
