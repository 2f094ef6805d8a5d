"""Learning-signal experiment: does a short AnaUS pre-training on phantoms teach the encoder anatomy?

Pipeline (CPU, minutes):
  1. phantom corpus (``make_phantom_corpus``): images + label maps + sidecar JSON with
     ``structures[].kind`` in {cyst, hypo, hyper, layer}; "background" = label 0 inside the
     field of view (the fan for sector probes).
  2. shards of the *pre-training split* with ground-truth masks (one per structure + the
     in-view background: the ``labels`` mask source's view of the phantoms).
  3. three encoders with the same ResNet-18 and the same seed: AnaUS (``objective: anaus``),
     whole-image BYOL (``objective: byol``, no L_ctx, single scale = classic BYOL) for the same
     steps, batch and schedule, and the random initialisation.
  4. frozen encoders, un-augmented images: mask-pooled backbone features (C3, C4, C5 — the
     exported torchvision ResNet, the same layers for every encoder) inside every structure and
     the background -> standardised -> multinomial logistic regression (torch, L-BFGS) trained on
     the pre-training images, evaluated on held-out images (never seen by pre-training or by the
     probe). No setting was chosen by looking at the test split.

Run:  nice -n 10 python3 benchmarks/probe_phantoms.py --out /tmp/probe [--quick]
Prints a markdown table and writes ``results.json`` into ``--out``.

Real-scan mode (issue 10): ``--annotations --geometry sector`` burns text, rulers, calipers, a
colour bar and a logo into the phantoms; ``--masks felzenszwalb`` pre-trains on the masks of
the precompute pipeline instead of the ground truth, with (default) or without
(``--no-scan-region``, the masks the code made before scan regions: identical output) the scan
region. The mask statistics (share of mask pixels outside the true field of view, masks that
lie mostly outside it) are printed with the probe.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

KINDS = ("cyst", "hypo", "hyper", "layer", "background")


def build_corpus(out: Path, *, count: int, size: int, seed: int) -> list[dict]:
    """Phantoms -> list of {key, image, label, kinds {label value: kind}, view (bool)}."""
    from PIL import Image

    from anaus_core.phantoms import make_phantom_corpus
    from anaus_core.phantoms.corpus import read_sidecar
    from anaus_core.phantoms.geometry import fan_mask

    corpus = out / "corpus"
    if not (corpus / "label" / f"phantom_{count - 1:05d}.json").exists():
        make_phantom_corpus(corpus, count=count, size=size, seed=seed, annotations=ANNOTATIONS["on"], geometry=ANNOTATIONS["geometry"])
    items = []
    for index in range(count):
        key = f"phantom_{index:05d}"
        sidecar = read_sidecar(corpus / "label" / f"{key}.json")
        items.append({
            "key": key,
            "image": np.asarray(Image.open(corpus / "img" / f"{key}.png").convert("L")),
            "label": np.asarray(Image.open(corpus / "label" / f"{key}.png")),
            "kinds": {int(s["label"]): s["kind"] for s in sidecar["structures"]},
            "view": (np.asarray(Image.open(corpus / sidecar["annotations"]["field_of_view_png"])) > 0) if "annotations" in sidecar
                    else fan_mask(size, sidecar.get("fan")),
        })
    return items


ANNOTATIONS = {"on": False, "geometry": None}


def pipeline_shards(items: list[dict], out: Path, *, masker: str, scan_region: bool, size: int) -> tuple[Path, dict]:
    """Shards of the pre-training split made by the precompute pipeline (``masker``), and the
    mask statistics against the true field of view."""
    from pipeline.config import PrecomputeConfig
    from pipeline.job import run_precompute
    from shards.reader import ShardReader

    corpus_list = out / "train-list.txt"
    corpus_list.write_text("".join(f"corpus/img/{item['key']}.png\n" for item in items))
    shards = out / f"shards-{masker}-{'region' if scan_region else 'whole'}"
    report = run_precompute(PrecomputeConfig(corpus=str(corpus_list), out=str(shards), masker=masker, stored_size=size,
                                             scan_region=scan_region, samples_per_shard=64, progress=False), show_report=False)
    views = {f"corpus/img/{item['key']}.png": item["view"] for item in items}
    reader = ShardReader(shards)
    outside_pixels = total_pixels = masks = mostly_outside = residual_outside = residual_total = 0
    for key in reader.keys():
        sample = reader[key]
        view = views[sample.record["source_path"]]
        for mask, source in zip(sample.mask_set.masks, sample.mask_set.sources):
            outside = int((mask & ~view).sum())
            area = int(mask.sum())
            outside_pixels += outside
            total_pixels += area
            masks += 1
            mostly_outside += outside > 0.5 * area
            if source == "residual":
                residual_outside += outside
                residual_total += area
    stats = {
        "samples": len(reader), "skipped": len(report.errors), "masks": masks,
        "mask_pixels_outside_fov": round(outside_pixels / max(1, total_pixels), 4),
        "masks_mostly_outside_fov": mostly_outside,
        "residual_pixels_outside_fov": round(residual_outside / max(1, residual_total), 4),
    }
    return shards, stats


def region_masks(item: dict) -> tuple[np.ndarray, list[str]]:
    """bool (M, H, W) masks of every structure and of the in-view background, and their kinds."""
    masks, kinds = [], []
    for value, kind in sorted(item["kinds"].items()):
        mask = item["label"] == value
        if mask.any():
            masks.append(mask)
            kinds.append(kind)
    background = (item["label"] == 0) & item["view"]
    if background.any():
        masks.append(background)
        kinds.append("background")
    return np.stack(masks), kinds


def write_shards(items: list[dict], out: Path) -> Path:
    from anaus_core.maskset import MaskSet
    from shards.sample import ShardSample
    from shards.writer import ShardWriter

    if (out / "manifest.json").exists():
        return out
    with ShardWriter(out, samples_per_shard=64, fingerprints={"mask": "phantom-labels"}) as writer:
        for item in items:
            masks, kinds = region_masks(item)
            mask_set = MaskSet(masks=masks, ids=np.arange(1, len(masks) + 1), sources=["labels"] * len(masks),
                               scores=np.ones(len(masks)))
            writer.write(ShardSample.build(key=item["key"], image=item["image"], mask_set=mask_set,
                                           record={"source_path": f"corpus/img/{item['key']}.png", "kinds": kinds}))
    return out


def pretrain_encoder(name: str, shards: Path, out: Path, *, steps: int, args) -> tuple[object, dict]:
    from anaus_core.config import load_config
    from anaus_core.train import PretrainConfig, pretrain
    from cli import shard_data_source

    overrides = {
        "data.shards": str(shards), "data.batch_size": args.batch_size, "data.num_workers": args.num_workers,
        "data.shuffle_buffer": 256,
        "views.size": args.crop, "views.num_mask_samples": args.k, "views.core_min_side": 8,
        "augment.view1.blur_kernel": 9, "augment.view2.blur_kernel": 9,
        "optim.base_lr": args.base_lr, "optim.warmup_steps": max(1, steps // 20),
        "run.steps": steps, "run.device": "cpu", "run.seed": args.seed, "run.log_every": 10,
        "run.checkpoint_every": 0, "run.progress": False, "run.tensorboard": False,
        "model.fpn_channels": args.fpn_channels, "model.projector_hidden_dim": args.projector_hidden, "model.predictor_hidden_dim": args.predictor_hidden,
    }
    if name == "byol":
        overrides.update({"model.objective": "byol", "model.context": False, "model.multi_scale": False})
    config = load_config(PretrainConfig, None, overrides)
    run = out / f"run-{name}"
    if (run / "encoder.pt").exists():
        from anaus_core.train.trainer import build_model

        model = build_model(config)
        model.online_encoder.backbone.load_state_dict(torch.load(run / "encoder.pt", weights_only=True))
        info = json.loads((run / "probe-info.json").read_text())
        return model, info
    start = time.perf_counter()
    result = pretrain(config, run, data=shard_data_source(config))
    info = {"steps": result.steps_done, "seconds": time.perf_counter() - start,
            "first_loss": result.records[0]["loss"], "last_loss": result.records[-1]["loss"]}
    (run / "probe-info.json").write_text(json.dumps(info))
    return result.model, info


@torch.no_grad()
def region_features(backbone: torch.nn.Module, items: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """Mask-pooled C3/C4/C5 features of every region of every item: (N, 896), class index (N,)."""
    from anaus_core.augment.device import IMAGENET_MEAN, IMAGENET_STD, normalize_gray

    backbone.eval()
    features, targets = [], []
    for item in items:
        masks, kinds = region_masks(item)
        image = torch.from_numpy(np.array(item["image"])).float().div(255.0)[None, None]
        x = normalize_gray(image, IMAGENET_MEAN, IMAGENET_STD)
        x = backbone.maxpool(backbone.relu(backbone.bn1(backbone.conv1(x))))
        stages = []
        for layer in (backbone.layer1, backbone.layer2, backbone.layer3, backbone.layer4):
            x = layer(x)
            stages.append(x)
        mask_tensor = torch.from_numpy(masks).float()[None]  # (1, M, H, W)
        pooled = []
        for fmap in stages[1:]:  # C3, C4, C5
            cells = F.adaptive_avg_pool2d(mask_tensor, fmap.shape[-2:])  # area fractions
            weights = cells / cells.sum(dim=(-2, -1), keepdim=True).clamp_min(1e-6)
            pooled.append(torch.einsum("bmhw,bchw->bmc", weights, fmap)[0])
        features.append(torch.cat(pooled, dim=1).numpy())
        targets.extend(KINDS.index(kind) for kind in kinds)
    return np.concatenate(features), np.asarray(targets)


def linear_probe(train_x, train_y, test_x, test_y, *, weight_decay: float, seed: int) -> dict:
    """Standardise on train, multinomial logistic regression by L-BFGS; accuracy + balanced accuracy."""
    torch.manual_seed(seed)
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    xtr = torch.from_numpy((train_x - mean) / std).float()
    xte = torch.from_numpy((test_x - mean) / std).float()
    ytr, yte = torch.from_numpy(train_y).long(), torch.from_numpy(test_y).long()
    probe = torch.nn.Linear(xtr.shape[1], len(KINDS))
    optimizer = torch.optim.LBFGS(probe.parameters(), lr=1.0, max_iter=300, history_size=20,
                                  line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(probe(xtr), ytr) + weight_decay * probe.weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        predicted = probe(xte).argmax(1)
        train_acc = float((probe(xtr).argmax(1) == ytr).float().mean())
    accuracy = float((predicted == yte).float().mean())
    per_class = [float((predicted[yte == c] == c).float().mean()) for c in range(len(KINDS)) if (yte == c).any()]
    return {"accuracy": accuracy, "balanced_accuracy": float(np.mean(per_class)), "train_accuracy": train_acc}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("/tmp/anaus-probe"))
    parser.add_argument("--count", type=int, default=300, help="phantoms in total")
    parser.add_argument("--test-count", type=int, default=100, help="held-out phantoms (the last ones)")
    parser.add_argument("--size", type=int, default=96, help="phantom side in pixels")
    parser.add_argument("--crop", type=int, default=64, help="view size during pre-training")
    parser.add_argument("--k", type=int, default=8, help="masks sampled per image")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--base-lr", type=float, default=16.0,
                        help="base lr; x batch/256 = peak lr (1.0 at batch 16: short-schedule setting)")
    parser.add_argument("--num-workers", type=int, default=1)
    parser.add_argument("--fpn-channels", type=int, default=64,
                        help="FPN width (paper 256; at 256 the P2 smoothing convs dominate a CPU step)")
    parser.add_argument("--projector-hidden", type=int, default=512, help="projector MLP hidden width (paper 1024)")
    parser.add_argument("--predictor-hidden", type=int, default=1024, help="predictor MLP hidden width (paper 4096)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--weight-decay", type=float, default=1e-3, help="probe L2 penalty")
    parser.add_argument("--only", choices=["anaus", "byol", "random"], action="append",
                        help="encoders to evaluate (default all three)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test of the script")
    parser.add_argument("--annotations", action="store_true", help="phantoms with burned-in overlays (make-phantoms --annotations)")
    parser.add_argument("--geometry", choices=["linear", "sector"], default=None, help="one probe geometry for all phantoms")
    parser.add_argument("--masks", default="truth", help="truth (label masks) or a precompute masker (felzenszwalb, kmeans)")
    parser.add_argument("--no-scan-region", action="store_true", help="pipeline masks without the scan region (the code before it)")
    args = parser.parse_args(argv)
    ANNOTATIONS.update(on=args.annotations, geometry=args.geometry)
    if args.quick:
        args.count, args.test_count, args.steps, args.batch_size = 24, 8, 4, 8
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)

    items = build_corpus(args.out, count=args.count, size=args.size, seed=args.seed)
    train_items, test_items = items[: args.count - args.test_count], items[args.count - args.test_count:]
    results: dict = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    if args.masks == "truth":
        shards = write_shards(train_items, args.out / "shards")
    else:
        shards, stats = pipeline_shards(train_items, args.out, masker=args.masks, scan_region=not args.no_scan_region, size=args.size)
        results["mask_statistics"] = stats
        print("mask statistics", json.dumps(stats), flush=True)

    from anaus_core.config import load_config
    from anaus_core.train import PretrainConfig
    from anaus_core.train.trainer import build_model

    for name in args.only or ["random", "byol", "anaus"]:
        if name == "random":
            config = load_config(PretrainConfig, None, {"run.seed": args.seed})
            model, info = build_model(config), {"steps": 0}
        else:
            model, info = pretrain_encoder(name, shards, args.out, steps=args.steps, args=args)
        backbone = model.online_encoder.backbone
        train_x, train_y = region_features(backbone, train_items)
        test_x, test_y = region_features(backbone, test_items)
        scores = linear_probe(train_x, train_y, test_x, test_y, weight_decay=args.weight_decay, seed=args.seed)
        results[name] = {**info, **scores, "train_regions": int(len(train_y)), "test_regions": int(len(test_y))}
        print(name, json.dumps(results[name]), flush=True)
    results["class_counts_test"] = {KINDS[c]: int((test_y == c).sum()) for c in range(len(KINDS))}
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    print("\n| encoder | pre-training steps | probe accuracy (held-out) | balanced accuracy | probe train acc |")
    print("|---|---|---|---|---|")
    for name in args.only or ["random", "byol", "anaus"]:
        r = results[name]
        print(f"| {name} | {r['steps']} | {r['accuracy']:.3f} | {r['balanced_accuracy']:.3f} | {r['train_accuracy']:.3f} |")
    return results


if __name__ == "__main__":
    main()
