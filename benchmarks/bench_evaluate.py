"""Evaluation benchmarks.

1. ``speed``: (a) the linear protocol's cost per 1,000 images with features cached (the
   feature pass, reported separately, then the lr x wd grid over k folds on the cached
   features), and (b) segmentation fine-tuning throughput (images/s, light FPN decoder,
   ResNet-18, finetune-full) on the chosen device. Medians of repeats.
2. ``phantoms``: the phantom comparison of docs/benchmarks.md: a short AnaUS pre-training and a
   whole-image BYOL pre-training (``model.objective=byol``, ``model.context=false``: one
   whole-image mask, same network, same steps, same shards) vs ``random``, evaluated on
   held-apart phantoms (classification of the dominant structure kind, segmentation of cysts),
   5 folds, paired Wilcoxon p-values. Every step is the ordinary CLI
   (make-phantoms -> precompute-masks -> pretrain -> evaluate).
   ``--arms`` picks the encoders: ``anaus``, ``byol``, ``avit`` (A-ViT with ACDT), ``avit_noacdt``
   (the same A-ViT with ``avit.acdt=none``) and ``random``. With an A-ViT arm the store gets one
   anatomy category per image, the phantom's probe geometry (``linear``/``sector``, from its label
   JSON, through ``precompute-masks --anatomy csv:...``: a pack-only change), and the two A-ViT
   pre-trainings run one after the other with docs/avit.md's optimiser (AdamW, lr 5e-4 per 256,
   wd 0.04). ``random_vit`` is that ViT untrained (seed 0). ``--anaus-encoder`` evaluates an
   existing AnaUS encoder instead of training one.

3. ``regions``: the region probe (features pooled inside each structure and the tissue around
   it; the online evaluation's ``task: regions``) of given encoders on a ``phantoms`` work dir's
   held-apart phantoms, with paired tests over images.

Run:  python3 benchmarks/bench_evaluate.py speed [--device cuda]
      python3 benchmarks/bench_evaluate.py phantoms --work /tmp/phantom-eval [--steps 300]
      python3 benchmarks/bench_evaluate.py phantoms --work /tmp/avit-eval \
          --arms anaus,avit,avit_noacdt,random,random_vit --avit-steps 60 [--anaus-encoder ENC.pt] [--no-segmentation]
      python3 benchmarks/bench_evaluate.py regions --work /tmp/avit-eval --encoder anaus=/tmp/avit-eval/anaus/encoder.pt \
          --encoder avit=/tmp/avit-eval/avit/encoder.pt --encoder random
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def speed(args) -> dict:
    from anaus_core.evaluate.backbones import build_backbone, set_trainable
    from anaus_core.evaluate.config import FinetuneConfig, LinearConfig
    from anaus_core.evaluate.encoders import EncoderSpec, load_encoder
    from anaus_core.evaluate.features import extract_features
    from anaus_core.evaluate.folds import make_folds
    from anaus_core.evaluate.linear import train_linear_grid
    from anaus_core.evaluate.seg_heads import build_segmenter
    from anaus_core.evaluate.segment import train_segmenter
    from anaus_core.evaluate.tensors import resolve_device

    device = resolve_device(args.device)
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    weights = load_encoder(EncoderSpec("random", None))
    n, size, classes = args.images, args.size, 3
    images = rng.integers(0, 255, (n, size, size), dtype=np.uint8)
    labels = rng.integers(0, classes, n)
    backbone = build_backbone(weights)
    extract_features(backbone, images[:8], device=device)  # warm-up
    t0 = time.perf_counter()
    features = extract_features(backbone, images, device=device, batch_size=64)
    feature_s = time.perf_counter() - t0
    folds = make_folds(labels, [str(i) for i in range(n)], k=5, seed=0, val_fraction=0.2)
    config = LinearConfig()
    grid_times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        for fold in folds:
            tr, va, te = (np.array(x) for x in (fold.train, fold.val, fold.test))
            train_linear_grid(features[tr], torch.from_numpy(labels[tr]), features[va], torch.from_numpy(labels[va]),
                              features[te], num_classes=classes, config=config, seed=0, device=device)
        grid_times.append(time.perf_counter() - t0)
    grid_s = statistics.median(grid_times)
    # segmentation fine-tuning images/s
    seg_n = args.seg_images
    seg_images = images[:seg_n]
    targets = (rng.random((seg_n, size, size)) < 0.1).astype(np.int64)
    model = build_segmenter(weights, build_backbone(weights), num_classes=2)
    set_trainable(model.backbone, last_stages=None)
    seg_times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        train_segmenter(model, images=seg_images, targets=targets, train=np.arange(seg_n), select=np.arange(2),
                        num_classes=2, epochs=1, lr=1e-3, weight_decay=1e-4, batch_size=FinetuneConfig().batch_size,
                        seed=0, device=device)
        seg_times.append(time.perf_counter() - t0)
    seg_ips = seg_n / statistics.median(seg_times)
    result = {
        "device": str(device), "torch_threads": torch.get_num_threads(), "images": n, "size": size,
        "feature_pass_s_per_1000": feature_s / n * 1000,
        "linear_grid_s_per_1000": grid_s / n * 1000,
        "linear_total_s_per_1000": (feature_s + grid_s) / n * 1000,
        "heads": len(config.learning_rates) * len(config.weight_decays), "folds": 5, "linear_epochs": config.epochs,
        "segmentation_finetune_images_per_s": seg_ips, "segmentation_images": seg_n,
    }
    print(json.dumps(result, indent=1))
    return result


def _cli(*args: str, log) -> None:
    command = [sys.executable, "-m", "cli", *args]
    print("$", " ".join(command), file=log, flush=True)
    started = time.perf_counter()
    subprocess.run(command, cwd=REPO, check=True, stdout=log, stderr=subprocess.STDOUT,
                   env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    print(f"# {time.perf_counter() - started:.0f} s", file=log, flush=True)


ARMS = ("anaus", "byol", "avit", "avit_noacdt", "random", "random_vit")


def write_random_vit(args, out_dir: Path) -> Path:
    """The A-ViT arms' ViT (``--avit-size``, ``--avit-patch``, ``--size`` px) at its timm
    initialisation (seed 0), untrained: the baseline that says what the A-ViT pre-training added
    (``random`` is a random ResNet-18)."""
    from anaus_core.avit.backbone import build_vit

    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    vit = build_vit(size=args.avit_size, img_size=args.size, patch_size=args.avit_patch)
    torch.save(vit.state_dict(), out_dir / "encoder.pt")
    return out_dir / "encoder.pt"


def write_geometry_anatomy_csv(corpus: Path, out: Path) -> dict[str, int]:
    """``file,category`` rows for ``precompute-masks --anatomy csv:``: each phantom's probe geometry
    (its label JSON's ``geometry``), a category that says nothing about the structure kinds the
    classification task asks for."""
    rows, counts = ["file,category"], {}
    for label in sorted((corpus / "label").glob("*.json")):
        meta = json.loads(label.read_text())
        rows.append(f"{label.stem}.png,{meta['geometry']}")
        counts[meta["geometry"]] = counts.get(meta["geometry"], 0) + 1
    out.write_text("\n".join(rows) + "\n")
    return counts


def avit_pretrain_args(args, variant: str) -> list[str]:
    """The short CPU A-ViT run: ``--avit-size`` ViT at 64 px (patch ``--avit-patch``), 2 global
    64 px + ``--avit-local`` local 32 px crops, a slimmer DINO head than DINO's 65 536 outputs,
    AdamW at docs/avit.md's lr 5e-4 (per 256 images; ``--avit-lr``) and weight decay 0.04."""
    return ["--method", "avit", "--batch-size", str(args.avit_batch_size), "--num-workers", "0", "--device", "cpu",
            "--seed", "0", "--steps", str(args.avit_steps), "--no-progress",
            "--set", f"avit.size={args.avit_size}", "--set", f"avit.patch_size={args.avit_patch}",
            "--set", f"avit.acdt={variant}", "--set", f"avit.crops.global_size={args.size}",
            "--set", f"avit.crops.local_size={args.size // 2}", "--set", f"avit.crops.num_local={args.avit_local}",
            "--set", f"avit.head_output_dim={args.avit_head_dim}", "--set", "avit.disc_channels=16",
            "--set", "optim.name=adamw", "--lr", str(args.avit_lr), "--set", "optim.weight_decay=0.04",
            *(["--set", f"optim.warmup_steps={args.avit_warmup_steps}"] if args.avit_warmup_steps is not None else []),
            "--log-every", "1", "--checkpoint-every", str(max(1, args.avit_steps // 2))]


def phantoms(args) -> None:
    from anaus_core.config import save_config
    from anaus_core.evaluate.phantom_tasks import write_phantom_tasks
    from cli import demo_pretrain_config

    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = sorted(set(arms) - set(ARMS))
    if unknown:
        raise SystemExit(f"--arms: unknown {unknown}; choose from {', '.join(ARMS)}")
    with_avit = any(a.startswith("avit") for a in arms)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    log = open(work / "log.txt", "a")
    shards = work / "shards"
    corpus = work / "pretrain_corpus"
    if not (corpus / "img").exists():
        _cli("make-phantoms", str(corpus), "--count", str(args.pretrain_count), "--size", str(args.size),
             "--seed", "0", log=log)
    manifest = shards / "manifest.json"
    has_anatomy = manifest.exists() and "anatomy" in json.loads(manifest.read_text())
    if not manifest.exists() or (with_avit and not has_anatomy):
        anatomy = []
        if with_avit:
            counts = write_geometry_anatomy_csv(corpus, work / "anatomy.csv")
            print(f"# anatomy categories (probe geometry): {counts}", file=log, flush=True)
            anatomy = ["--anatomy", f"csv:{work / 'anatomy.csv'}"]
        _cli("precompute-masks", str(corpus / "img"), "--out", str(shards), "--masker", "felzenszwalb",
             "--stored-size", str(args.size), "--no-progress", *anatomy, log=log)
    config_path = work / "pretrain.yaml"
    save_config(demo_pretrain_config(shards, steps=args.steps, seed=0, batch_size=args.batch_size), config_path)
    anaus_runs = {"anaus": [], "byol": ["--set", "model.objective=byol", "--set", "model.context=false"]}
    encoders = []
    for name in arms:
        if name == "random":
            encoders += ["--encoder", "random"]
            continue
        if name == "anaus" and args.anaus_encoder:
            encoders += ["--encoder", f"anaus={args.anaus_encoder}"]
            continue
        if not (work / name / "encoder.pt").exists():
            if name == "random_vit":
                write_random_vit(args, work / name)
            elif name in anaus_runs:
                _cli("pretrain", "--config", str(config_path), "--shards", str(shards), "--out", str(work / name),
                     "--steps", str(args.steps), "--no-progress", *anaus_runs[name], log=log)
            else:   # the A-ViT arms, one after the other
                variant = "acdt" if name == "avit" else "none"
                _cli("pretrain", "--shards", str(shards), "--out", str(work / name), *avit_pretrain_args(args, variant),
                     log=log)
        encoders += ["--encoder", f"{name}={work / name / 'encoder.pt'}"]
    held = work / "heldapart"
    if not (held / "img").exists():
        _cli("make-phantoms", str(held), "--count", str(args.eval_count), "--size", str(args.size), "--seed", "7919", log=log)
    tasks = write_phantom_tasks(held, work / "tasks", segment_kind="cyst", min_per_class=args.folds + 2)
    print(f"# tasks: {tasks}", file=log, flush=True)
    common = ["--folds", str(args.folds), "--image-size", str(args.size), "--no-progress", "--device", "cpu"]
    _cli("evaluate", str(tasks["classification"]), "--out", str(work / "eval_classification"), *encoders, *common,
         "--protocol", "linear", log=log)
    if args.segmentation:
        _cli("evaluate", str(tasks["segmentation"]), "--task", "segmentation", "--out", str(work / "eval_segmentation"),
             *encoders, *common, "--protocol", "linear", "--epochs", str(args.seg_epochs),
             "--set", "finetune.batch_size=16", log=log)
    print(f"# reports: {work / 'eval_classification' / 'results.md'}"
          + (f", {work / 'eval_segmentation' / 'results.md'}" if args.segmentation else ""), file=log, flush=True)


def regions(args) -> dict:
    """The region probe (``anaus_core.evaluate.regions`` through the online evaluator's
    ``task: regions``) of every ``--encoder`` on ``WORK/heldapart``'s phantoms: features pooled
    inside each structure and the tissue around them, classes = structure kind + tissue, 5 folds
    over images, out-of-fold kNN and linear predictions; paired two-sided Wilcoxon tests over
    images (each image's share of correctly classified regions). Writes ``WORK/regions.md`` and
    ``WORK/regions.json``."""
    from itertools import combinations

    from anaus_core.evaluate.backbones import build_backbone
    from anaus_core.evaluate.encoders import load_encoder, parse_encoder_option
    from anaus_core.evaluate.metrics.paired_test import paired_wilcoxon
    from anaus_core.evaluate.online import OnlineEvalConfig, OnlineEvaluator
    from anaus_core.evaluate.phantom_tasks import write_phantom_tasks
    from pipeline.frame_reader import IngestFrameReader

    work = Path(args.work)
    tasks = write_phantom_tasks(work / "heldapart", work / "tasks_regions", min_per_class=args.folds + 2)
    config = OnlineEvalConfig(data=str(tasks["regions"]), task="regions", max_images=100_000, folds=args.folds, seed=0)
    evaluator = OnlineEvaluator(config, reader=IngestFrameReader(), image_size=args.size)
    per_image: dict[str, dict[str, np.ndarray]] = {}
    rows = []
    for option in args.encoder:
        spec = parse_encoder_option(option)
        torch.manual_seed(0)  # the random baseline's initialisation
        predictions = evaluator.predictions(build_backbone(load_encoder(spec)))
        images = np.unique(predictions["image"])
        per_image[spec.name] = {
            probe: np.array([float((predictions[probe][predictions["image"] == i]
                                    == predictions["label"][predictions["image"] == i]).mean()) for i in images])
            for probe in ("linear", "knn")}
        rows.append({"encoder": spec.name, "regions": int(len(predictions["label"])), "images": int(len(images)),
                     **{probe: float((predictions[probe] == predictions["label"]).mean()) for probe in ("linear", "knn")}})
        print(f"{spec.name}: region linear {rows[-1]['linear']:.3f} knn {rows[-1]['knn']:.3f}", flush=True)
    tests = [{"a": a, "b": b, "probe": probe, **paired_wilcoxon(per_image[a][probe], per_image[b][probe])}
             for a, b in combinations(per_image, 2) for probe in ("linear", "knn")]
    lines = [f"region probe on {work / 'heldapart'}: {rows[0]['images']} images, {rows[0]['regions']} regions, "
             f"classes {evaluator.dataset.class_names}, {args.folds} folds over images", "",
             "| encoder | linear accuracy | kNN accuracy |", "|---|---|---|"]
    lines += [f"| {r['encoder']} | {r['linear']:.3f} | {r['knn']:.3f} |" for r in rows]
    lines += ["", "| a − b | probe | n images | median diff. | p (Wilcoxon) |", "|---|---|---|---|---|"]
    lines += [f"| {t['a']} − {t['b']} | {t['probe']} | {t['n']} | {t['median_difference']:+.3f} | {t['p_value']:.3g} |"
              for t in tests]
    (work / "regions.md").write_text("\n".join(lines) + "\n")
    result = {"rows": rows, "tests": tests, "classes": evaluator.dataset.class_names}
    (work / "regions.json").write_text(json.dumps(result, indent=1))
    print("\n".join(lines), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode", required=True)
    s = sub.add_parser("speed")
    s.add_argument("--device", default="cpu")
    s.add_argument("--images", type=int, default=1000)
    s.add_argument("--seg-images", type=int, default=64)
    s.add_argument("--size", type=int, default=224)
    s.add_argument("--repeats", type=int, default=3)
    p = sub.add_parser("phantoms")
    p.add_argument("--work", required=True)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--pretrain-count", type=int, default=200)
    p.add_argument("--eval-count", type=int, default=120)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--seg-epochs", type=int, default=8)
    p.add_argument("--segmentation", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--arms", default="anaus,byol,random", help=f"comma list of {', '.join(ARMS)}")
    p.add_argument("--anaus-encoder", default=None, help="evaluate this AnaUS encoder.pt instead of pre-training one")
    p.add_argument("--avit-steps", type=int, default=60)
    p.add_argument("--avit-size", default="tiny", help="micro or tiny on a CPU")
    p.add_argument("--avit-patch", type=int, default=16)
    p.add_argument("--avit-local", type=int, default=2, help="local crops per image")
    p.add_argument("--avit-head-dim", type=int, default=4096)
    p.add_argument("--avit-batch-size", type=int, default=16)
    p.add_argument("--avit-lr", type=float, default=0.0005,
                   help="AdamW base lr per 256 images (docs/avit.md: 5e-4; a short run may want more)")
    p.add_argument("--avit-warmup-steps", type=int, default=None, help="linear warm-up steps (default: the trainer's 3 epochs)")
    r = sub.add_parser("regions", help="region probe of --encoder NAME=PATH / random on WORK/heldapart")
    r.add_argument("--work", required=True)
    r.add_argument("--encoder", action="append", required=True)
    r.add_argument("--size", type=int, default=64)
    r.add_argument("--folds", type=int, default=5)
    args = parser.parse_args()
    {"speed": speed, "phantoms": phantoms, "regions": regions}[args.mode](args)


if __name__ == "__main__":
    main()
