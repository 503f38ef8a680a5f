"""Oracle: cross-entropy on the target domain's own labels (the upper bound of adaptation)."""
from udafast.methods.base import Method, seg_loss

__all__ = ["Oracle"]


class Oracle(Method):
    name = "oracle"
    uses_target_labels = True

    def step(self, batch, it, iters):
        target = batch["target"]
        out = self.model(self.normalize(target["image"]))
        loss = seg_loss(out["logits"], target["label"].to(self.device))
        opt = self.optimizers["model"]
        opt.zero_grad(set_to_none=True)
        self.backward(loss)
        opt.step()
        return {"seg": loss.detach()}
