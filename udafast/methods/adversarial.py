"""Output-space adversarial training (AdaptSegNet), shared by `adaptsegnet` and ProDA's warm-up.

Per level a fully convolutional discriminator sees the softmax of the (upsampled) segmentation
logits. The generator's adversarial loss pushes target predictions toward the source label 0; each
discriminator learns `w_s L(source, 0) + w_t L(target, 1)`: (0.5, 0.5) as AdaptSegNet's
`train_gta2cityscapes_multi.py` halves it, (1, 1) as ProDA's `adaptation_modelv2.py` `step_adv` sums
it. `gan="vanilla"` uses BCE-with-logits, `gan="lsgan"` the squared error (LS-GAN).
"""
import torch
import torch.nn.functional as F

from udafast.methods.base import build_optimizer, upsample
from udafast.models.heads import Discriminator

__all__ = ["OutputSpaceAdversary", "SOURCE_LABEL", "TARGET_LABEL", "GANS", "scaled_size", "check_scale"]

SOURCE_LABEL, TARGET_LABEL = 0.0, 1.0
GANS = ("vanilla", "lsgan")


#: the discriminator's five stride-2 4x4 convs need at least this many pixels per side
MIN_DISCRIMINATOR_SIZE = 32


def scaled_size(images, scale):
    """The size the discriminators see the predictions at: the input's (H, W) times `scale` (1 = the
    papers'; less makes the discriminators cheaper), but not below MIN_DISCRIMINATOR_SIZE."""
    h, w = images.shape[-2:]
    if min(h, w) < MIN_DISCRIMINATOR_SIZE:
        raise ValueError(f"images: the discriminators need inputs of at least {MIN_DISCRIMINATOR_SIZE} pixels "
                         f"per side, got {h}x{w} (use a larger crop)")
    return tuple(max(round(n * scale), MIN_DISCRIMINATOR_SIZE) for n in (h, w))


def check_scale(value, name):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ValueError(f"{name}: expected a number in (0, 1], got {value!r}")


def _gan_loss(logits, label, gan):
    target = torch.full_like(logits, label)
    if gan == "lsgan":
        return F.mse_loss(logits, target)
    return F.binary_cross_entropy_with_logits(logits, target)


class OutputSpaceAdversary:
    """One discriminator per level name (e.g. ("main", "aux")), their Adam optimiser spec, and the
    two losses. `device`: where the discriminators live; `discriminator`: its class (AdaptSegNet's
    `Discriminator` or ProDA's `ProDADiscriminator`)."""

    def __init__(self, levels, num_classes, gan="vanilla", optimizer=None, device="cpu", ndf=64,
                 disc_weights=(0.5, 0.5), discriminator=Discriminator):
        if gan not in GANS:
            raise ValueError(f"gan: expected one of {GANS}, got {gan!r}")
        if not levels:
            raise ValueError("levels: expected at least one level")
        self.levels, self.gan = tuple(levels), gan
        self.disc_weights = tuple(float(w) for w in disc_weights)
        self.discriminators = {lv: discriminator(num_classes, ndf).to(device) for lv in self.levels}
        spec = {"name": "adam", "lr": 1e-4, "betas": [0.9, 0.99], "weight_decay": 0.0, "schedule": "poly",
                "power": 0.9, **(optimizer or {})}
        params = [p for d in self.discriminators.values() for p in d.parameters()]
        self.optimizer = build_optimizer([{"params": params}], spec)

    def _requires_grad(self, flag):
        for d in self.discriminators.values():
            for p in d.parameters():
                p.requires_grad_(flag)

    def generator_loss(self, target_logits, size):
        """{level: adversarial loss} of the target logits (upsampled to `size`) against the source
        label, with the discriminators frozen; gradients flow into the segmentation network only."""
        self._requires_grad(False)
        try:
            return {lv: _gan_loss(self.discriminators[lv](F.softmax(upsample(target_logits[lv], size), dim=1)),
                                  SOURCE_LABEL, self.gan) for lv in self.levels}
        finally:
            self._requires_grad(True)

    def discriminator_step(self, source_logits, target_logits, source_size, target_size):
        """One optimiser step of every discriminator on detached predictions -> {level: loss}."""
        self.optimizer.zero_grad(set_to_none=True)
        losses = {}
        for lv in self.levels:
            d = self.discriminators[lv]
            src = F.softmax(upsample(source_logits[lv].detach(), source_size), dim=1)
            tgt = F.softmax(upsample(target_logits[lv].detach(), target_size), dim=1)
            w_src, w_tgt = self.disc_weights
            loss = w_src * _gan_loss(d(src), SOURCE_LABEL, self.gan) + w_tgt * _gan_loss(d(tgt), TARGET_LABEL, self.gan)
            self.backward(loss)
            losses[lv] = loss.detach()
        self.optimizer.step()
        return losses

    def backward(self, loss: torch.Tensor) -> None:
        """`loss.backward()`; `register` puts the method's in its place (which scales the loss under fp16)."""
        loss.backward()

    def register(self, method, prefix="disc"):
        """Put the discriminators and their optimiser into `method`'s saved state, and take its
        backward pass (`Method.backward`)."""
        self.backward = method.backward
        for lv, d in self.discriminators.items():
            method.modules[f"{prefix}_{lv}"] = d
        method.optimizers[prefix] = self.optimizer
