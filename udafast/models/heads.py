"""The methods' extra networks: AdaptSegNet's discriminator, DANN's per-pixel domain classifier and
the contrastive method's projection, prediction and per-class selector heads.

The per-pixel heads are 1x1 convs, so they take feature maps [B, D, H, W]; the projection and
prediction heads also take pixel rows [N, D] (treated as N 1x1 maps: BatchNorm statistics are then
over those rows, as in the authors' code, which applies them to the selected pixels only).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["Discriminator", "DomainClassifier", "ProjectionHead", "PredictionHead", "ClassSelectors"]


def _positive_int(value, name):
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name}: expected a positive integer, got {value!r}")
    return value


def _per_pixel(module, x, in_channels):
    if x.dim() == 2 and x.shape[1] == in_channels:
        return module(x[:, :, None, None])[:, :, 0, 0]
    if x.dim() == 4 and x.shape[1] == in_channels:
        return module(x)
    raise ValueError(f"x: expected [N, {in_channels}] or [B, {in_channels}, H, W], got {tuple(x.shape)}")


class Discriminator(nn.Module):
    """AdaptSegNet's fully convolutional discriminator: five 4x4 stride-2 convs (padding 1) with
    64, 128, 256, 512, 1 channels (times `ndf / 64`), LeakyReLU(0.2) between. Input: the softmax
    of the (upsampled) logits [B, num_classes, H, W]; output [B, 1, ~H/32, ~W/32] logits."""

    def __init__(self, num_classes: int = 19, ndf: int = 64):
        super().__init__()
        _positive_int(num_classes, "num_classes")
        _positive_int(ndf, "ndf")
        self.conv1 = nn.Conv2d(num_classes, ndf, 4, stride=2, padding=1)
        self.conv2 = nn.Conv2d(ndf, ndf * 2, 4, stride=2, padding=1)
        self.conv3 = nn.Conv2d(ndf * 2, ndf * 4, 4, stride=2, padding=1)
        self.conv4 = nn.Conv2d(ndf * 4, ndf * 8, 4, stride=2, padding=1)
        self.classifier = nn.Conv2d(ndf * 8, 1, 4, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4):
            x = F.leaky_relu(conv(x), 0.2)
        return self.classifier(x)


class ProDADiscriminator(nn.Module):
    """ProDA's warm-up discriminator (microsoft/ProDA models/discriminator.py `FCDiscriminator`): four
    3x3 stride-2 convs (padding 1) with 64, 128, 256, 512 channels (times `ndf / 64`), ReLU after
    the first three and LeakyReLU(0.2) after the fourth, then a 1x1 conv to one channel; output
    [B, 1, ~H/16, ~W/16] logits."""

    def __init__(self, num_classes: int = 19, ndf: int = 64):
        super().__init__()
        _positive_int(num_classes, "num_classes")
        _positive_int(ndf, "ndf")
        self.conv1 = nn.Conv2d(num_classes, ndf, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(ndf, ndf * 2, 3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(ndf * 2, ndf * 4, 3, stride=2, padding=1)
        self.conv4 = nn.Conv2d(ndf * 4, ndf * 8, 3, stride=2, padding=1)
        self.classifier = nn.Conv2d(ndf * 8, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in (self.conv1, self.conv2, self.conv3):
            x = F.relu(conv(x))
        return self.classifier(F.leaky_relu(self.conv4(x), 0.2))


class DomainClassifier(nn.Module):
    """DANN's per-pixel domain classifier: 1x1 convs in -> hidden -> hidden -> 1 with ReLU between
    (in 2048 for ResNet-101's stride-8 features); output [B, 1, H, W] logits. The gradient reversal
    belongs to the method, applied to the features before this."""

    def __init__(self, in_channels: int = 2048, hidden: int = 1024):
        super().__init__()
        _positive_int(in_channels, "in_channels")
        _positive_int(hidden, "hidden")
        self.layers = nn.Sequential(nn.Conv2d(in_channels, hidden, 1), nn.ReLU(inplace=True),
                                    nn.Conv2d(hidden, hidden, 1), nn.ReLU(inplace=True), nn.Conv2d(hidden, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class ProjectionHead(nn.Module):
    """The contrastive method's projection: in -> dim -> BatchNorm -> ReLU -> dim, per pixel."""

    def __init__(self, in_channels: int = 2048, dim: int = 256):
        super().__init__()
        self.in_channels = _positive_int(in_channels, "in_channels")
        _positive_int(dim, "dim")
        self.layers = nn.Sequential(nn.Conv2d(in_channels, dim, 1), nn.BatchNorm2d(dim), nn.ReLU(inplace=True),
                                    nn.Conv2d(dim, dim, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _per_pixel(self.layers, x, self.in_channels)


class PredictionHead(ProjectionHead):
    """The contrastive method's prediction head: dim -> dim -> BatchNorm -> ReLU -> dim, per pixel."""

    def __init__(self, dim: int = 256):
        super().__init__(dim, dim)


class ClassSelectors(nn.Module):
    """One selector per class, dim -> hidden -> BatchNorm -> LeakyReLU(0.2) -> 1, stored stacked
    (one weight tensor per layer, class first). `forward(z [N, dim], labels [N])` scores each row
    with its own class's selector -> raw scores [N] (the method takes `sigmoid(selector(z.detach()))`).
    As in the authors' code, each class's BatchNorm statistics come from that class's rows (one
    matmul per class present); a class with a single row in training mode is normalised with its
    running statistics, which batch statistics of one sample cannot give."""

    def __init__(self, num_classes: int = 19, dim: int = 256, hidden: int = 256, momentum: float = 0.1,
                 eps: float = 1e-5):
        super().__init__()
        self.num_classes = _positive_int(num_classes, "num_classes")
        self.dim = _positive_int(dim, "dim")
        _positive_int(hidden, "hidden")
        self.momentum, self.eps = momentum, eps
        w1 = torch.empty(num_classes, hidden, dim)
        w2 = torch.empty(num_classes, hidden)
        bound1, bound2 = dim ** -0.5, hidden ** -0.5  # nn.Linear's default init, per class
        self.weight1 = nn.Parameter(w1.uniform_(-bound1, bound1))
        self.bias1 = nn.Parameter(torch.empty(num_classes, hidden).uniform_(-bound1, bound1))
        self.bn_weight = nn.Parameter(torch.ones(num_classes, hidden))
        self.bn_bias = nn.Parameter(torch.zeros(num_classes, hidden))
        self.weight2 = nn.Parameter(w2.uniform_(-bound2, bound2))
        self.bias2 = nn.Parameter(torch.empty(num_classes).uniform_(-bound2, bound2))
        self.register_buffer("running_mean", torch.zeros(num_classes, hidden))
        self.register_buffer("running_var", torch.ones(num_classes, hidden))

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if z.dim() != 2 or z.shape[1] != self.dim:
            raise ValueError(f"z: expected [N, {self.dim}], got {tuple(z.shape)}")
        if labels.dim() != 1 or labels.shape[0] != z.shape[0] or labels.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"labels: expected int64 [{z.shape[0]}], got {labels.dtype} {tuple(labels.shape)}")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise ValueError(f"labels: expected class ids in [0, {self.num_classes}), got "
                             f"[{int(labels.min())}, {int(labels.max())}]")
        scores = z.new_empty(z.shape[0])  # in z's dtype: under autocast the per-class scores may come out narrower
        for c in torch.unique(labels).tolist():
            rows = (labels == c).nonzero().squeeze(1)
            h = F.linear(z[rows], self.weight1[c], self.bias1[c])
            # running_mean[c] is a view: F.batch_norm updates the class's row of the buffer in place.
            h = F.batch_norm(h, self.running_mean[c], self.running_var[c], self.bn_weight[c], self.bn_bias[c],
                             training=self.training and rows.numel() > 1, momentum=self.momentum, eps=self.eps)
            out = F.leaky_relu(h, 0.2) @ self.weight2[c] + self.bias2[c]
            scores = scores.index_put((rows,), out.to(scores.dtype))
        return scores
