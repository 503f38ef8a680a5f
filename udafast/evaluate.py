"""Evaluate a checkpoint on a labelled split, or score saved predictions.

    python -m udafast.evaluate --checkpoint CKPT [--dataset cityscapes --root DIR --split val] \\
        [--input-size 1024x512] [--device cuda] [--classes 19|16] [--save-predictions DIR] [--json FILE] \\
        [--flip] [--scales 0.75 1.0 1.25] [--slide CROP_H CROP_W --stride STRIDE_H STRIDE_W]
    python -m udafast.evaluate --predictions DIR --dataset cityscapes --root DIR --split val [--json FILE]

`--checkpoint CKPT` alone evaluates on the validation set of the run that made the checkpoint, as
that run did: its `data.val`, `eval.input_size` and `eval.classes`, which every checkpoint the
trainer writes carries (for an older checkpoint, read from the run folder's config.yaml beside
its checkpoints/ folder). `--dataset`, `--root`, `--split`, `--input-size` and `--classes` override
them; `--root` alone points the run's dataset at another folder. The run's `eval.max_images` is not
applied: the whole split is scored; test-time augmentation is what the flags say. A checkpoint from
elsewhere (e.g. the authors' released models) defaults to Cityscapes val. `--root` is needed only for
a dataset read from files (not for the embedded synthetic benchmark).

Prints the per-class IoU table and the mIoU (`miou`; plus `miou13` with `--classes 16`, the
SYNTHIA protocol). `--save-predictions DIR` writes the official Cityscapes format: label-id PNGs
`DIR/{city}/{city}_{seq}_{frame}_leftImg8bit.png` (train ids mapped back to Cityscapes label ids;
other datasets: `DIR/{stem}.png`), which `cityscapesscripts`' evaluator scores the same, and
colourised panels (image | prediction | ground truth) as JPEGs in `DIR/panels/` (JPEG so that the
official evaluator's `*.png` search of DIR never picks them up). `--flip`, `--scales` and `--slide`
average the softmax over the image and its mirror, over scales of the input, and make it by sliding
windows, as mmsegmentation's test-time augmentation (udafast.inference).
"""
import argparse
import os
import sys

import numpy as np
import torch

from udafast.engine import evaluation


#: datasets that read no files, so need no --root
ROOTLESS_DATASETS = ("synthetic",)


def load_model(checkpoint, device="cpu"):
    """The model saved in `checkpoint` (see udafast.models), on `device`, in eval mode.

    The run's evaluation settings come with it: `model.eval_input_size`, the network input size
    (w, h) the run's config evaluates at, or None (each image's own size); `model.eval_classes`
    (19 or 16, or None when unknown) and `model.val_split`, the run's `data.val` entry (None when
    unknown). The trainer stores them in the checkpoint; for an older checkpoint they are read
    from the run folder's config.yaml (checkpoints/../config.yaml) when there is one."""
    checkpoint = str(checkpoint)
    if not os.path.isfile(checkpoint):
        raise FileNotFoundError(f"checkpoint not found: {checkpoint}")
    from udafast.models import load_model_checkpoint, model_from_checkpoint

    state = load_model_checkpoint(checkpoint, map_location="cpu")  # also the authors' released models
    model = model_from_checkpoint(state, map_location="cpu").to(device).eval()
    run = _run_settings(checkpoint, state)
    size = run["input_size"]
    model.eval_input_size = tuple(size) if size is not None else None
    model.eval_classes, model.val_split = run["classes"], run["val"]
    return model


def _run_settings(path, state):
    """{"val", "classes", "input_size"} of the run that wrote the checkpoint at `path` (dict `state`)."""
    if "data_val" in state:
        return {"val": state["data_val"], "classes": state.get("eval_classes"),
                "input_size": state.get("eval_input_size")}
    config = {}
    folder = os.path.dirname(os.path.abspath(path))
    run_config = os.path.join(os.path.dirname(folder), "config.yaml")
    if os.path.basename(folder) == "checkpoints" and os.path.isfile(run_config):
        import yaml

        with open(run_config) as f:
            try:
                config = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise ValueError(f"{run_config}: not readable YAML ({str(e).splitlines()[0]})") from None
    evaluation_config = config.get("eval") or {}
    return {"val": (config.get("data") or {}).get("val"), "classes": evaluation_config.get("classes"),
            "input_size": state.get("eval_input_size", evaluation_config.get("input_size"))}


def parse_size(text):
    """'WxH' -> (W, H)."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT (e.g. 1024x512), got {text!r}") from None
    if w <= 0 or h <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive WIDTHxHEIGHT, got {text!r}")
    return w, h


def add_inference_arguments(p: argparse.ArgumentParser) -> None:
    """The test-time augmentation flags (see `inference_options`)."""
    g = p.add_argument_group("test-time augmentation (mmsegmentation's; default: one whole view)")
    g.add_argument("--flip", action="store_true",
                   help="average the softmax of each image and of its mirror (mirrored back)")
    g.add_argument("--scales", type=float, nargs="+", metavar="S", default=[1.0],
                   help="average over these factors of the input size, e.g. 0.75 1.0 1.25 (default 1.0)")
    g.add_argument("--slide", type=int, nargs=2, metavar=("CROP_H", "CROP_W"), default=None,
                   help="run the network on CROP_HxCROP_W windows (needs --stride); overlapping logits "
                        "are averaged")
    g.add_argument("--stride", type=int, nargs=2, metavar=("STRIDE_H", "STRIDE_W"), default=None,
                   help="the windows' step in pixels, at most the window size")


def inference_options(args: argparse.Namespace):
    """The `InferenceOptions` of the flags of `add_inference_arguments`."""
    from udafast.inference import InferenceOptions

    return InferenceOptions.create(args.flip, args.scales, args.slide, args.stride,
                                   names=("--flip", "--scales", "--slide", "--stride"))


def default_device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def save_image(path, array, **options):
    from PIL import Image

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(np.ascontiguousarray(array)).save(path, **options)


def _to_uint8_rgb(image):
    return (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()


class PredictionWriter:
    """`on_prediction` for `evaluate_model`: the label-id PNG and a colourised panel per image."""

    def __init__(self, folder, dataset):
        self.folder = str(folder)
        self.dataset = dataset

    def __call__(self, index, sample, pred):
        from udafast.data.labels import colorize

        stem = os.path.splitext(os.path.basename(sample["name"]))[0]
        sub = self._city(index)
        save_image(os.path.join(self.folder, sub, stem + ".png"), evaluation.train_ids_to_label_ids(pred.numpy()))
        panel = [_to_uint8_rgb(sample["image"]), colorize(pred)]
        if "label" in sample:
            panel.append(colorize(sample["label"]))
        save_image(os.path.join(self.folder, "panels", stem + ".jpg"), np.concatenate(panel, axis=1), quality=90)

    def _city(self, index):
        """The city folder of a Cityscapes image (mirrored, as the official results layout), else ''."""
        from udafast.data import Cityscapes

        if isinstance(self.dataset, Cityscapes):
            return os.path.basename(os.path.dirname(self.dataset.images[index]))
        return ""


def build_parser():
    p = argparse.ArgumentParser(prog="python -m udafast.evaluate", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n")[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="model checkpoint to evaluate")
    src.add_argument("--predictions", help="folder of saved label-id PNGs to score instead of a model")
    p.add_argument("--dataset", default=None,
                   help="dataset name (default: the checkpoint's run's val dataset, else cityscapes)")
    p.add_argument("--root", default=None,
                   help="dataset root folder (default: the checkpoint's run's; not needed for synthetic)")
    p.add_argument("--split", default=None, help="split to evaluate (default: the checkpoint's run's, else val)")
    p.add_argument("--input-size", metavar="WxH", type=parse_size, default=None,
                   help="network input WIDTHxHEIGHT (default: the checkpoint's eval_input_size, "
                        "else each image's own size)")
    p.add_argument("--device", default=None, help="torch device (default cuda when available)")
    p.add_argument("--classes", type=int, choices=(19, 16), default=None,
                   help="19 classes, or 16 (+13) for SYNTHIA-trained models (default: the checkpoint's run's, "
                        "else 19)")
    p.add_argument("--save-predictions", metavar="DIR", help="write label-id PNGs and colour panels here")
    p.add_argument("--json", metavar="FILE", help="write the scores as JSON here")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    add_inference_arguments(p)
    return p


def select_data(args, val_split=None, classes=None) -> dict:
    """Fill in `args.dataset`, `args.root`, `args.split` and `args.classes` where the flags left
    them out: from the run's `val_split` (its `data.val` entry) and `classes`, else Cityscapes val
    with 19 classes -> the dataset's options (the run's, when it is the run's dataset). ValueError
    naming --root when the dataset reads files and no folder is known; FileNotFoundError naming
    the run's folder when it is not on this machine."""
    val_split = val_split or {}
    run_dataset = val_split.get("name")
    args.dataset = args.dataset or run_dataset or "cityscapes"
    same = args.dataset == run_dataset
    if args.root is None and same and val_split.get("root") is not None:
        args.root = val_split["root"]
        if not os.path.isdir(args.root):
            raise FileNotFoundError(f"--root: the run's dataset folder {args.root} (data.val.root, stored with "
                                    f"the checkpoint) is not here; give --root DIR")
    args.split = args.split or (val_split.get("split") if same else None) or "val"
    args.classes = args.classes or classes or 19
    if args.root is None and args.dataset.lower() not in ROOTLESS_DATASETS:
        raise ValueError(f"--root: the {args.dataset} dataset is read from a folder; give --root DIR")
    return dict(val_split.get("options") or {}) if same else {}


def run(args) -> dict:
    from udafast.data import build_dataset
    from udafast.engine.devices import check_device

    if args.checkpoint is not None and not os.path.isfile(args.checkpoint):
        raise FileNotFoundError(f"checkpoint not found: {args.checkpoint}")
    if args.predictions is not None and args.save_predictions:
        raise ValueError("--save-predictions: only with --checkpoint")
    inference = inference_options(args)
    device = check_device(args.device or default_device(), "--device")
    if args.checkpoint is not None:  # read and checked before the dataset
        model = load_model(args.checkpoint, device)
        options = select_data(args, getattr(model, "val_split", None), getattr(model, "eval_classes", None))
    else:
        options = select_data(args)
    dataset = build_dataset(args.dataset, args.root, args.split, **options)
    if not args.quiet:
        print(f"evaluating on {args.dataset} {args.split}" + (f" in {args.root}" if args.root else "")
              + (f", options {options}" if options else ""), file=sys.stderr)
    progress = None if args.quiet else print_progress
    if args.predictions is not None:
        result = evaluation.score_predictions(args.predictions, dataset, classes=args.classes, progress=progress)
        meta = {"predictions": args.predictions}
    else:
        writer = PredictionWriter(args.save_predictions, dataset) if args.save_predictions else None
        input_size = args.input_size or getattr(model, "eval_input_size", None)
        result = evaluation.evaluate_model(model, dataset, input_size=input_size, device=device,
                                           classes=args.classes, on_prediction=writer, progress=progress,
                                           inference=inference)
        meta = {"checkpoint": args.checkpoint,
                "input_size": list(args.input_size) if args.input_size else None,
                "inference": inference.as_dict()}
    if progress is not None:
        print(file=sys.stderr)
    evaluation.print_table(result)
    if args.json:
        evaluation.write_json(result, args.json, dataset=args.dataset, root=args.root, split=args.split, **meta)
    return result


def print_progress(done, total):
    print(f"\r{done}/{total} images", end="", file=sys.stderr, flush=True)


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"udafast.evaluate: error: {e}")


if __name__ == "__main__":
    main()
