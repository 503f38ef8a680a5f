"""The domain gap of the embedded `synthetic` benchmark: the small network trained on source labels
only vs. the same network trained on target labels (the oracle), both scored on target val.

    PYTHONPATH=. python benchmarks/synthetic_gap.py            # about 3 minutes on 2 CPU cores

Prints both mIoUs and writes them, with the settings, per-class IoUs and timings, to
benchmarks/results/synthetic-gap.json. A UDA method run with the same settings should land
between the two numbers.
"""
import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from udafast.data import build_dataset  # noqa: E402
from udafast.data.transforms import normalize  # noqa: E402
from udafast.engine.evaluation import evaluate_model, write_json  # noqa: E402
from udafast.models import build_model  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "synthetic-gap.json")


def batches(dataset, batch_size, iterations, generator):
    """`iterations` random batches (with horizontal flips) of (images, labels)."""
    for _ in range(iterations):
        index = torch.randint(len(dataset), (batch_size,), generator=generator).tolist()
        samples = [dataset[i] for i in index]
        images = torch.stack([s["image"] for s in samples])
        labels = torch.stack([s["label"] for s in samples])
        flip = torch.rand(batch_size, generator=generator) < 0.5
        images[flip] = images[flip].flip(-1)
        labels[flip] = labels[flip].flip(-1)
        yield images, labels


def train(dataset, args, seed):
    """The small network trained with cross-entropy on `dataset` (Adam, poly learning rate)."""
    torch.manual_seed(seed)
    model = build_model({"name": "small", "num_classes": 19})
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(seed)
    for it, (images, labels) in enumerate(batches(dataset, args.batch_size, args.iterations, generator)):
        for group in optimizer.param_groups:
            group["lr"] = args.lr * (1 - it / args.iterations) ** 0.9
        logits = model(normalize(images, model.normalization))["logits"]
        logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=True)
        loss = F.cross_entropy(logits, labels, ignore_index=255)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if args.verbose and (it + 1) % 50 == 0:
            print(f"  iter {it + 1}/{args.iterations}  loss {loss.item():.3f}", flush=True)
    return model


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--size", type=int, nargs=2, default=(128, 256), metavar=("H", "W"))
    parser.add_argument("--train-length", type=int, default=1000, help="training scenes per domain (cached)")
    parser.add_argument("--val-length", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=RESULTS)
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    common = dict(size=tuple(args.size), cache=True)
    source = build_dataset("synthetic", None, "train", domain="source", length=args.train_length, **common)
    target = build_dataset("synthetic", None, "train", domain="target", length=args.train_length,
                           with_labels=True, **common)
    val = build_dataset("synthetic", None, "val", domain="target", length=args.val_length, **common)

    result = {"settings": {"model": "small", "iterations": args.iterations, "batch_size": args.batch_size,
                           "optimizer": "Adam, poly 0.9", "lr": args.lr, "size": list(args.size),
                           "train_length": args.train_length, "val_length": args.val_length,
                           "threads": args.threads, "seed": args.seed, "torch": torch.__version__}}
    start = time.perf_counter()
    for name, dataset in (("source_only", source), ("oracle", target)):
        t0 = time.perf_counter()
        model = train(dataset, args, args.seed)
        t1 = time.perf_counter()
        scores = evaluate_model(model, val)
        t2 = time.perf_counter()
        result[name] = {"miou": scores["miou"], "iou": scores["iou"], "train_s": round(t1 - t0, 1),
                        "eval_s": round(t2 - t1, 1)}
        print(f"{name:<12} mIoU {scores['miou']:6.2f}  (train {t1 - t0:.0f} s, eval {t2 - t1:.0f} s)", flush=True)
    result["gap"] = result["oracle"]["miou"] - result["source_only"]["miou"]
    result["total_s"] = round(time.perf_counter() - start, 1)
    print(f"gap          {result['gap']:6.2f} mIoU points  (total {result['total_s']:.0f} s)")
    write_json(result, args.out)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
