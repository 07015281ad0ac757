"""Command line for prediction, ensembling, distillation, CNN features and visualisation.

    python -m trainer predict --checkpoint runs/digits/best.pt --images data/digits/val --out preds.csv --tta hflip
    python -m trainer ensemble --inputs a.csv b.csv --method mean --out fused.csv
    python -m trainer distill --teacher runs/r18/best.pt --model mobilenet_v3_small --data data/digits --out runs/kd
    python -m trainer features --checkpoint runs/digits/best.pt --data data/digits --classifier svm --out svm.joblib
    python -m trainer visualize --checkpoint runs/digits/best.pt --image IMG --layers layer1 --out vis/

Each handler only parses arguments and calls the library (trainer.predict, trainer.ensemble,
trainer.engine.distill, trainer.features, trainer.visualize). docs/trainer-extras.md has the details.
"""
from __future__ import annotations

import json

from .config import add_config_arguments, resolve_config
from .tta import MERGES, NAMED
from .errors import UserError


def _cmd_predict(args) -> int:
    from .predict import predict_checkpoint

    table = predict_checkpoint(args.checkpoint, args.images, args.tta, args.tta_merge, args.device, args.batch_size,
                               args.workers, args.weights, args.amp, progress=not args.quiet)
    table.write_csv(args.out, args.topk, args.save_probs)
    bad = sum(1 for e in table.errors if e)
    if not args.quiet:
        print(f"wrote {len(table.ids)} rows to {args.out} (tta {args.tta}, merge {args.tta_merge})"
              + (f"; {bad} unreadable image(s) have an error row" if bad else ""))
    return 0


def _cmd_ensemble(args) -> int:
    from .ensemble import ensemble_files, parse_weights

    table, info = ensemble_files(args.inputs, args.method, parse_weights(args.weights), args.on_mismatch)
    table.write_csv(args.out, args.topk, save_probs=True)
    print(f"fused {len(info['inputs'])} inputs ({info['fusion']}, weights {info['weights']}) over "
          f"{info['rows']} ids -> {args.out}")
    return 0


def _cmd_distill(args) -> int:
    from .engine.checkpoint import load_checkpoint
    from .engine.distill import DistillConfig, distill

    base = None
    if args.resume:
        base = load_checkpoint(f"{args.resume}/last.pt")["config"]
        base["resume"] = args.resume
    cfg = resolve_config(args, base, cls=DistillConfig)
    summary = distill(cfg)
    if not cfg.quiet:
        print(f"student {cfg.model}: best validation top-1 {summary['best_top1']:.4f} (epoch {summary['best_epoch']}) "
              f"distilled from {', '.join(cfg.teacher)} (alpha {cfg.kd_alpha}, T {cfg.kd_temperature}"
              f"{', hard labels' if cfg.kd_hard else ''}); checkpoint {summary['best_checkpoint']}")
    return 0


def _cmd_features(args) -> int:
    from .features import parse_grid, parse_params, predict_with_classifier, train_classifier

    if args.predict:
        if not args.images or not args.out:
            raise UserError("--predict needs --images DIR_OR_LIST and --out preds.csv")
        table = predict_with_classifier(args.predict, args.checkpoint, args.images, args.device, args.batch_size,
                                        args.workers)
        table.write_csv(args.out, args.topk, save_probs=True)
        print(f"wrote {len(table.ids)} rows to {args.out}")
        return 0
    if not args.data:
        raise UserError("give --data (a dataset with a training and a validation split) to fit a classifier")
    grid = parse_grid(args.grid_param, args.classifier) if (args.grid or args.grid_param) else None
    result = train_classifier(args.checkpoint, args.data, args.classifier, parse_params(args.param), grid, args.cv,
                              args.out, args.cache, args.device, args.batch_size, args.workers, args.seed)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{args.classifier} on {result['feature_dim']}-d {result['arch']} features: val top-1 "
              f"{result['val_top1']:.4f} (CNN head {result['cnn_head_val_top1']:.4f}, {result['val_samples']} images)"
              + (f"; grid best {result['grid_best_params']} (cv top-1 {result['grid_cv_top1']:.4f})"
                 if "grid_best_params" in result else "")
              + (f"; saved {result['out']}" if result.get("out") else ""))
    return 0


def _cmd_visualize(args) -> int:
    from .inference import model_from_checkpoint
    from .visualize import list_layers, visualize_image

    if args.list_layers:
        loaded = model_from_checkpoint(args.checkpoint)
        for name, kind, shape in list_layers(loaded.model, loaded.preprocess.crop_size):
            print(f"{name:<50} {kind:<28} {'x'.join(map(str, shape)) if shape else '-'}")
        return 0
    if not args.image:
        raise UserError("give --image IMG (or --list-layers to see the layer names)")
    layers = [s.strip() for s in (args.layers or "").split(",") if s.strip()]
    result = visualize_image(args.checkpoint, args.image, args.out, layers, not args.no_cam, args.cam_layer,
                             args.cam_class, args.max_channels)
    if "predicted" in result:
        print(f"predicted {result['predicted']} (p={result['predicted_prob']:.3f}); Grad-CAM for class "
              f"{result['cam_class']} at {result['cam_layer']}")
    for f in result["files"]:
        print(f"wrote {f}")
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("predict", help="predict labels for images (with TTA) into a CSV")
    p.add_argument("--checkpoint", required=True, help="RUN_DIR/best.pt (or a run directory)")
    p.add_argument("--images", required=True, help="a folder (searched recursively), one image, or a list file")
    p.add_argument("--out", required=True, help="CSV to write: id,label,prob[,topN_label,topN_prob][,prob_<class>],error")
    p.add_argument("--tta", default="none", help=f"TTA policy: {', '.join(NAMED)}")
    p.add_argument("--tta-merge", default="mean", choices=MERGES, help="how views' probabilities are merged")
    p.add_argument("--topk", type=int, default=1, help="also write the top-K labels and probabilities")
    p.add_argument("--save-probs", action="store_true", help="write one probability column per class (for ensembles)")
    p.add_argument("--weights", default="auto", choices=["auto", "model", "ema"])
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", default="none", choices=["none", "auto", "bf16", "fp16"])
    p.add_argument("--batch-size", type=int, default=64, help="images per batch (each brings its TTA views)")
    p.add_argument("--workers", type=int, default=-1)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("ensemble", help="fuse prediction CSVs (probability mean, weighted mean, or vote)")
    p.add_argument("--inputs", nargs="+", required=True, help="prediction CSVs or header-less id,label files "
                   "(quoted globs are expanded)")
    p.add_argument("--method", default="mean", choices=["mean", "weighted", "vote"])
    p.add_argument("--weights", help="one weight per input, e.g. 0.5,0.3,0.2 (default: equal, or _wN in file names)")
    p.add_argument("--on-mismatch", default="error", choices=["error", "intersect"],
                   help="inputs with different id sets: stop with a report, or fuse the common ids")
    p.add_argument("--topk", type=int, default=1)
    p.add_argument("--out", required=True)
    p.set_defaults(func=_cmd_ensemble)

    from .engine.distill import DistillConfig

    p = sub.add_parser("distill", help="train a student with knowledge distillation from teacher checkpoint(s)",
                       description="Every train flag applies; --teacher is required (unless resuming).")
    add_config_arguments(p, DistillConfig)
    p.set_defaults(func=_cmd_distill)

    p = sub.add_parser("features", help="CNN penultimate features + a scikit-learn classifier")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", help="dataset root: fit on its training split, score on its validation split")
    p.add_argument("--classifier", default="svm", choices=["svm", "rf", "mlp", "knn", "logreg"])
    p.add_argument("--param", action="append", metavar="K=V", help="classifier parameter override (repeatable)")
    p.add_argument("--grid", action="store_true", help="grid search with cross-validation (default grid)")
    p.add_argument("--grid-param", action="append", metavar="K=V1,V2", help="grid values (repeatable; implies --grid)")
    p.add_argument("--cv", type=int, default=5, help="cross-validation folds for --grid")
    p.add_argument("--cache", help="features cache (.npz), reused when the checkpoint and files are the same")
    p.add_argument("--out", help="fit: classifier file (.joblib); --predict: CSV")
    p.add_argument("--predict", metavar="CLF.joblib", help="predict --images with a saved classifier")
    p.add_argument("--images", help="with --predict: folder, image or list file")
    p.add_argument("--topk", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_features)

    p = sub.add_parser("visualize", help="feature-map grids and Grad-CAM overlays (PNG)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--image", help="image to explain")
    p.add_argument("--layers", help="comma-separated layer names for feature-map grids")
    p.add_argument("--list-layers", action="store_true", help="print layer names and output shapes, then exit")
    p.add_argument("--cam-layer", help="Grad-CAM target layer (default: the family's last feature map)")
    p.add_argument("--cam-class", help="class name to explain (default: the predicted class)")
    p.add_argument("--no-cam", action="store_true", help="feature maps only")
    p.add_argument("--max-channels", type=int, default=32)
    p.add_argument("--out", default="vis")
    p.set_defaults(func=_cmd_visualize)
