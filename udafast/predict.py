"""Segment any images with a checkpoint.

    python -m udafast.predict --checkpoint CKPT IMAGE_OR_DIR... --out DIR [--input-size WxH] [--device D] \\
        [--flip] [--scales 0.75 1.0 1.25] [--slide CROP_H CROP_W --stride STRIDE_H STRIDE_W]

For each image (a folder contributes the image files directly in it), writes `DIR/{stem}.png`,
the train ids (0-18) as a greyscale PNG at the image's own size, and `DIR/overlay/{stem}.png`,
the image blended half and half with the prediction in the Cityscapes palette. `--flip`, `--scales`
and `--slide` are test-time augmentation, as in `python -m udafast.evaluate`. A file that cannot
be read (not an image, a damaged one) does not stop the others: every prediction that can be made
is written, then each file that could not be read is listed with its reason, one line each, and
the exit status is 1.
"""
import argparse
import os
import sys

import numpy as np

from udafast import evaluate
from udafast.engine import evaluation

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def collect_images(inputs):
    """The image files named by `inputs` (files, or folders whose image files are taken, sorted);
    FileNotFoundError names a missing path, ValueError two images with the same stem."""
    files = []
    for item in inputs:
        item = str(item)
        if os.path.isdir(item):
            files += sorted(os.path.join(item, f) for f in os.listdir(item)
                            if f.lower().endswith(IMAGE_SUFFIXES) and not f.startswith("."))
        elif os.path.isfile(item):
            files.append(item)
        else:
            raise FileNotFoundError(f"image or folder not found: {item}")
    if not files:
        raise ValueError(f"inputs: no image files in {', '.join(map(str, inputs))}")
    seen = {}
    for f in files:
        stem = os.path.splitext(os.path.basename(f))[0]
        if stem in seen:
            raise ValueError(f"inputs: {seen[stem]} and {f} would both be written as {stem}.png")
        seen[stem] = f
    return files


def predict_files(model, files, out, *, input_size=None, device=None, progress=None, inference=None,
                  on_error=None):
    """Write the label PNG and overlay of each image file into `out`; returns the label paths.
    `inference`: test-time augmentation (`udafast.inference.InferenceOptions`).
    `on_error(path, reason)`: called for a file that cannot be read, which is then passed over
    (default: the error is raised)."""
    from udafast.data.io import BadSampleError, load_image
    from udafast.data.labels import colorize

    model.eval()
    written = []
    for i, path in enumerate(files):
        try:
            image = load_image(path)
        except (BadSampleError, OSError) as e:
            if on_error is None:
                raise
            on_error(path, e.reason if isinstance(e, BadSampleError) else str(e))
            if progress is not None:
                progress(i + 1, len(files))
            continue
        pred = evaluation.predict(model, image, input_size=input_size, device=device,
                                  inference=inference).argmax(0).cpu()
        stem = os.path.splitext(os.path.basename(path))[0]
        label_path = os.path.join(out, stem + ".png")
        evaluate.save_image(label_path, pred.numpy().astype(np.uint8))
        rgb = image.permute(1, 2, 0).numpy() * 255.0
        overlay = (0.5 * rgb + 0.5 * colorize(pred).astype(np.float32)).round().astype(np.uint8)
        evaluate.save_image(os.path.join(out, "overlay", stem + ".png"), overlay)
        written.append(label_path)
        if progress is not None:
            progress(i + 1, len(files))
    return written


def build_parser():
    p = argparse.ArgumentParser(prog="python -m udafast.predict", description=__doc__.split("\n\n")[0])
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="image files or folders of images")
    p.add_argument("--checkpoint", required=True, help="model checkpoint")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--input-size", metavar="WxH", type=evaluate.parse_size, default=None,
                   help="network input WIDTHxHEIGHT (default: the checkpoint's eval_input_size, "
                        "else each image's own size)")
    p.add_argument("--device", default=None, help="torch device (default cuda when available)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    evaluate.add_inference_arguments(p)
    return p


def run(args):
    from udafast.engine.devices import check_device

    inference = evaluate.inference_options(args)
    files = collect_images(args.inputs)
    device = check_device(args.device or evaluate.default_device(), "--device")
    model = evaluate.load_model(args.checkpoint, device)
    progress = None if args.quiet else evaluate.print_progress
    input_size = args.input_size or getattr(model, "eval_input_size", None)
    failed = []
    written = predict_files(model, files, args.out, input_size=input_size, device=device, progress=progress,
                            inference=inference, on_error=lambda path, reason: failed.append((path, reason)))
    if progress is not None:
        print(file=sys.stderr)
    print(f"wrote {len(written)} predictions to {args.out}")
    if failed:
        for path, reason in failed:
            print(f"udafast.predict: could not read {path}: {reason}", file=sys.stderr)
        raise ValueError(f"{len(failed)} of {len(files)} input files could not be read (listed above)")
    return written


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"udafast.predict: error: {e}")


if __name__ == "__main__":
    main()
