"""Source only: cross-entropy on the labelled source domain (the lower bound adaptation must beat)."""
from udafast.methods.base import Method, seg_loss

__all__ = ["SourceOnly"]


class SourceOnly(Method):
    name = "source_only"
    uses_target = False

    def step(self, batch, it, iters):
        source = batch["source"]
        out = self.model(self.normalize(source["image"]))
        loss = seg_loss(out["logits"], source["label"].to(self.device))
        opt = self.optimizers["model"]
        opt.zero_grad(set_to_none=True)
        self.backward(loss)
        opt.step()
        return {"seg": loss.detach()}
