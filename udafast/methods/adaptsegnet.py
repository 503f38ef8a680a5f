"""AdaptSegNet: adversarial learning in the output space, at one or two levels.

Generator (the segmentation network), per iteration:

    L_G = CE_main(source) + 0.1 CE_aux(source) + 0.001 L_adv(D_main, target) + 0.0002 L_adv(D_aux, target)

where `L_adv(D, target) = L(D(softmax(up(logits_target))), 0)` asks each level's discriminator to
take the target prediction for a source one (label 0); the aux terms (layer3 head) only at
`multi_level`. Then each discriminator takes one step on `0.5 L(source, 0) + 0.5 L(target, 1)`
of the detached predictions. `L` is BCE-with-logits, or the squared error with `gan="lsgan"`.
Logits are upsampled (bilinear, align_corners) to each domain's input size before the softmax.

Tsai et al., "Learning to Adapt Structured Output Space for Semantic Segmentation", CVPR 2018
(https://github.com/wasidennis/AdaptSegNet). Where the paper is silent the code decides
(train_gta2cityscapes_multi.py, model/deeplab_multi.py): every BatchNorm affine frozen while batch
statistics are used (`model.freeze_bn_affine`, on by default for DeepLabV2), the poly schedule of
the network and of the discriminators over NUM_STEPS 250k while the run stops at 150k
(`optimizer.poly_iters`, `adaptsegnet.discriminator.poly_iters` in the shipped configs), the
generator's two backward passes then the discriminators' on detached, upsampled predictions, all
three optimisers stepping after them (the same values as stepping the generator first: the
discriminators' inputs are detached before it). Where they disagree the paper is the default: the
code's ASPP sums only dilations 6 and 12 (`model.aspp: two`, off by default). A test runs two
iterations against a transcription of the code (tests/fixtures/authors/adaptsegnet_iteration.json).
"""
from udafast.methods.adversarial import GANS, OutputSpaceAdversary, check_scale, scaled_size
from udafast.methods.base import Method, seg_loss
from udafast.methods.context import RunContext

__all__ = ["AdaptSegNet"]

#: the network's output behind each level
_OUTPUTS = {"main": "logits", "aux": "aux"}


def _number(options, key):
    v = options[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
        raise ValueError(f"adaptsegnet.{key}: expected a number >= 0, got {v!r}")


def _check(options):
    if not isinstance(options["multi_level"], bool):
        raise ValueError(f"adaptsegnet.multi_level: expected true or false, got {options['multi_level']!r}")
    if options["gan"] not in GANS:
        raise ValueError(f"adaptsegnet.gan: expected one of {GANS}, got {options['gan']!r}")
    for key in ("seg_weight_aux", "adv_weight_main", "adv_weight_aux"):
        _number(options, key)
    check_scale(options["adv_scale"], "adaptsegnet.adv_scale")
    ndf = options["ndf"]
    if isinstance(ndf, bool) or not isinstance(ndf, int) or ndf <= 0:
        raise ValueError(f"adaptsegnet.ndf: expected a positive integer, got {ndf!r}")
    d = options["discriminator"]
    if not isinstance(d, dict) or d.get("name") not in ("adam", "sgd") or isinstance(d.get("lr"), bool) or \
            not isinstance(d.get("lr"), (int, float)) or not d["lr"] > 0:
        raise ValueError(f"adaptsegnet.discriminator: expected name adam or sgd and lr > 0, got {d!r}")


class AdaptSegNet(Method):
    name = "adaptsegnet"
    defaults = {
        "multi_level": True,        # main + aux levels (42.4 reported); false: main only (41.4)
        "gan": "vanilla",           # "vanilla" (BCE) or "lsgan" (squared error)
        "seg_weight_aux": 0.1,
        "adv_weight_main": 0.001,
        "adv_weight_aux": 0.0002,
        "ndf": 64,                  # discriminator width (64, 128, 256, 512, 1 channels)
        # the discriminators see the predictions upsampled to this fraction of each domain's input
        # size (the paper: 1, the input size); < 1 only to save time on small runs
        "adv_scale": 1.0,
        "discriminator": {"name": "adam", "lr": 1.0e-4, "betas": [0.9, 0.99], "weight_decay": 0.0,
                          "schedule": "poly", "power": 0.9},
    }

    @staticmethod
    def model_overrides(model_config):
        """The code's BatchNorm: every affine frozen (model/deeplab_multi.py sets requires_grad False),
        batch statistics used (model.train()); the paper is silent, so the code is the default.
        An explicit `model.freeze_bn_affine` wins; the small CPU model has no such option."""
        if model_config.get("name") == "deeplabv2_r101" and "freeze_bn_affine" not in model_config:
            return {"freeze_bn_affine": True}
        return {}

    def __init__(self, config: dict, ctx: RunContext):
        super().__init__(config, ctx)
        _check(self.options)
        self.levels = ("main", "aux") if self.options["multi_level"] else ("main",)

    def start_stage(self, stage, model, resume=False):
        super().start_stage(stage, model, resume)
        self.adversary = OutputSpaceAdversary(self.levels, int(self.config["model"]["num_classes"]),
                                              gan=self.options["gan"], optimizer=self.options["discriminator"],
                                              device=self.device, ndf=self.options["ndf"])
        self.modules = {}
        self.adversary.register(self)

    def _levels(self, out):
        return {lv: out[_OUTPUTS[lv]] for lv in self.levels}

    def _adv_size(self, images):
        return scaled_size(images, self.options["adv_scale"])

    def step(self, batch, it, iters):
        source, target = batch["source"], batch["target"]
        o = self.options
        opt = self.optimizers["model"]
        opt.zero_grad(set_to_none=True)
        losses = {}

        # generator, source half: segmentation (backward now, as the authors' code, to free the graph)
        labels = source["label"].to(self.device)
        out_s = self._levels(self.model(self.normalize(source["image"])))
        losses["seg_main"] = seg_loss(out_s["main"], labels)
        loss = losses["seg_main"]
        if "aux" in out_s:
            losses["seg_aux"] = seg_loss(out_s["aux"], labels)
            loss = loss + o["seg_weight_aux"] * losses["seg_aux"]
        self.backward(loss)

        # generator, target half: fool the (frozen) discriminators
        target_size = self._adv_size(target["image"])
        out_t = self._levels(self.model(self.normalize(target["image"])))
        adv = self.adversary.generator_loss(out_t, target_size)
        loss = sum(o[f"adv_weight_{lv}"] * adv[lv] for lv in self.levels)
        self.backward(loss)
        opt.step()

        # discriminators: one step per level on the detached predictions
        d = self.adversary.discriminator_step(out_s, out_t, self._adv_size(source["image"]), target_size)
        losses.update({f"adv_{lv}": adv[lv] for lv in self.levels})
        losses.update({f"d_{lv}": d[lv] for lv in self.levels})
        return {k: v.detach() for k, v in losses.items()}
