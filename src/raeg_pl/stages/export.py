"""Stage 3: protected (and recovered) PNG folders of a method, measured from the stored files.

``export`` (the pipeline) exports the RAEG-protected training split; the grid's
``methods/<row>`` stages export any :class:`raeg_pl.methods.ProtectionMethod` through the
same :func:`method_export_stage`. Images are written and read back through
:mod:`raeg_pl.io.protected` only.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

from raeg_pl.config import DEFAULT_EVAL_DEFENSES, export_settings
from raeg_pl.data.datamodule import ImageClassificationDataModule, apply_defense_uint8
from raeg_pl.stages.common import StageRunner, stage_of
from raeg_pl.utils.run import write_results


def accuracy(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy of ``model`` on uint8 images (N, C, H, W), in batches of 500.

    The batches go to the model's device (a method may have moved its surrogate to the GPU
    while the images stay in host memory)."""
    first = next(model.parameters(), None)
    device = first.device if first is not None else images.device
    correct = 0
    with torch.no_grad():
        for i in range(0, len(images), 500):
            logits = model(images[i : i + 500].to(device).float() / 255)
            correct += int((logits.argmax(1).cpu() == labels[i : i + 500].cpu()).sum())
    return correct / max(1, len(images))


def method_export_stage(
    stage_dir: Path,
    method,
    dm: ImageClassificationDataModule,
    eval_defenses: list[str],
    surrogate: torch.nn.Module,
    heldout: dict[str, torch.nn.Module] | None = None,
    data_cfg: dict | None = None,
    extra: dict | None = None,
    inference_per_class: int | None = None,
) -> dict:
    """Writes clean / protected (/ recovered) PNG folders of one method and measures them.

    Every figure comes from the stored 8-bit files: fidelity of the protected images,
    reversibility of the images an authorised user restores from them (reversible methods
    only), the surrogate's accuracy on the published training images, and inference-time
    protection: accuracy of the surrogate and of held-out clean-trained classifiers on
    protected held-out test images after each real defence.

    Args:
        stage_dir: the stage folder (gets ``clean/``, ``protected/``, ``recovered/``).
        method: a :class:`raeg_pl.methods.ProtectionMethod`.
        dm: the owner's data (set up); its training split is protected, its test split is
            used for inference-time protection.
        eval_defenses: real defence specs for the inference-time figures.
        surrogate: frozen classifier (logits from [0, 1] images).
        heldout: more frozen classifiers, by name, trained on clean data.
        data_cfg: recorded in the manifests.
        extra: more result fields.
        inference_per_class: per-class subset of the test split for the inference-time
            figures (None: all of it); attacks on every test image dominate a CPU budget.
    """
    from raeg_pl.io.protected import load_export, tensor_fingerprint, write_image_folder
    from raeg_pl.metrics import ImageQuality, class_structure

    images, labels = dm.train_set.images, dm.train_set.labels
    files, classes = dm.train_files, dm.classes
    common = {"classes": classes, "files": files, "labels": labels}
    meta = {
        "method": method.config(),
        "source_fingerprint": tensor_fingerprint(images, labels),
        "data": data_cfg,
    }
    write_image_folder(stage_dir / "clean", images, kind="clean", **common, extra=meta)
    t0 = time.perf_counter()
    method.fit(images, labels)
    protected = method.protect(images, labels)
    protect_s = time.perf_counter() - t0
    write_image_folder(stage_dir / "protected", protected, kind="protected", **common, extra=meta)
    meta["method"] = method.config()  # fitting may have recorded more (rounds run...)
    # Everything below reads the stored files back, as a pirate or an authorised user would.
    p_images, p_labels, _, rels, _ = load_export(stage_dir / "protected")
    c_images, _, _, _, _ = load_export(stage_dir / "clean")
    q_prot, q_rec = ImageQuality(), ImageQuality()
    r_images = None
    if method.reversible:
        src_files = [Path(r).relative_to("train").as_posix() for r in rels]
        write_image_folder(
            stage_dir / "recovered",
            method.recover(p_images, p_labels),
            p_labels,
            classes,
            src_files,
            kind="recovered",
            extra=meta,
        )
        r_images = load_export(stage_dir / "recovered")[0]
    for i in range(0, len(c_images), 1024):
        q_prot.update(p_images[i : i + 1024], c_images[i : i + 1024])
        if r_images is not None:
            q_rec.update(r_images[i : i + 1024], c_images[i : i + 1024])
    qp = q_prot.compute()
    qr = q_rec.compute() if r_images is not None else None
    # How much of the stored perturbation is one pattern per class (a pirate with the labels
    # can estimate and remove that part).
    structure = {  # NaN (no pair of images to compare) is stored as null: valid JSON
        k: None if v != v else v
        for k, v in class_structure(c_images, p_images, p_labels, len(classes)).items()
    }

    # Inference-time protection on held-out clean test images, after 8-bit storage.
    test_x, test_y = dm.test_set.images, dm.test_set.labels
    if inference_per_class is not None:
        from raeg_pl.data.datamodule import per_class_subset

        idx = per_class_subset(
            test_y, torch.arange(len(test_y)), inference_per_class, dm.num_classes, dm.seed
        )
        test_x, test_y = test_x[idx], test_y[idx]
    classifiers = {"surrogate": surrogate, **(heldout or {})}
    clean_acc = {k: accuracy(m, test_x, test_y) for k, m in classifiers.items()}
    by_defense: dict[str, dict[str, float]] = {k: {} for k in classifiers}
    if method.protects_unseen:
        stored = method.protect(test_x, test_y)
        for spec in eval_defenses:
            defended = stored if spec in ("none", "identity") else apply_defense_uint8(stored, spec)
            for k, m in classifiers.items():
                by_defense[k][spec] = accuracy(m, defended, test_y)

    def opt(q, key):
        return None if q is None else float(q[key])

    results = {
        "reversible": bool(method.reversible),
        "method": meta["method"],
        "psnr_protected": float(qp["psnr"]),
        "ssim_protected": float(qp["ssim"]),
        "linf_protected": float(qp["linf"]),
        "l2_protected": float(qp["l2"]),
        "perturbation_classmean_share": structure["classmean_share"],
        "perturbation_cos_same_class": structure["cos_same_class"],
        "perturbation_cos_diff_class": structure["cos_diff_class"],
        "psnr_recovered": opt(qr, "psnr"),
        "ssim_recovered": opt(qr, "ssim"),
        "exact_pixel_rate_recovered": opt(qr, "exact_pixel_rate"),
        "surrogate_acc_clean": clean_acc["surrogate"],
        "surrogate_acc_protected": by_defense["surrogate"].get("none"),
        "surrogate_acc_protected_by_defense": by_defense["surrogate"],
        "heldout_acc_clean": {k: v for k, v in clean_acc.items() if k != "surrogate"},
        "heldout_acc_protected_by_defense": {
            k: v for k, v in by_defense.items() if k != "surrogate"
        },
        # The published images themselves (what a pirate downloads), as stored.
        "surrogate_acc_protected_train": accuracy(surrogate, p_images, p_labels),
        "surrogate_acc_clean_train": accuracy(surrogate, c_images, p_labels),
        "exported_images": len(images),
        "test_images": len(dm.test_set),
        "inference_test_images": len(test_x),
        "protect_seconds": round(protect_s, 1),
        "protect_img_per_s": round(len(images) / max(protect_s, 1e-9), 1),
        # Crafting cost (fit + protect of the training split) per 1,000 images.
        "craft_seconds_per_1000": round(1000.0 * protect_s / max(len(images), 1), 2),
        **(extra or {}),
    }
    write_results(stage_dir, results, json.dumps([meta["method"], data_cfg], sort_keys=True))
    return results


def export_stage(
    stage_dir: Path,
    protector_ckpt: Path,
    surrogate_ckpt: Path,
    data_cfg: dict,
    eval_defenses: list[str],
    run_dir: Path,
    refine_steps: int = 0,
) -> dict:
    """Exports the RAEG-protected training split and measures it (see method_export_stage).

    ``refine_steps``: restore-aware rounding of the stored images (the config's
    ``export.refine_steps``)."""
    from raeg_pl.lit.protector import load_surrogate
    from raeg_pl.methods.raeg import RAEGMethod

    dm = ImageClassificationDataModule(**data_cfg)
    dm.setup()
    method = RAEGMethod(protector_ckpt, refine_steps=refine_steps)
    results = method_export_stage(
        stage_dir, method, dm, eval_defenses, load_surrogate(surrogate_ckpt), data_cfg=data_cfg
    )
    results["protector_fingerprint"] = method.net.fingerprint()
    write_results(stage_dir, results, json.dumps(data_cfg, sort_keys=True))
    return results


def export_method(
    stage_dir: Path,
    params: dict,
    surrogate_ckpts: list[Path],
    heldout_ckpts: dict[str, Path],
    data_cfg: dict,
    eval_defenses: list[str],
    seed: int = 0,
    inference_per_class: int | None = None,
    extra: dict | None = None,
    say: Callable[[str], None] = print,
) -> dict:
    """Builds a method from its row parameters and exports and measures it (a grid stage).

    Args:
        stage_dir: the stage folder.
        params: ``{"kind": ..., **constructor arguments}``
            (:func:`raeg_pl.methods.create_method`); a RAEG row's holds its ``checkpoint``.
        surrogate_ckpts: the surrogates the method attacks; the first one also measures.
        heldout_ckpts: clean-trained classifiers by name; those not trained yet are left
            out, with a message.
        data_cfg: the owner's data.
        eval_defenses: real defence specs for the inference-time figures.
        seed: the method's seed.
        inference_per_class: see :func:`method_export_stage`.
        extra: more result fields.
        say: prints a progress line.
    """
    from raeg_pl.lit.protector import load_surrogate
    from raeg_pl.methods import create_method

    dm = ImageClassificationDataModule(**data_cfg)
    dm.setup()
    models = [load_surrogate(p) for p in surrogate_ckpts]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    method = create_method(params, models, device=device, seed=seed)
    heldout = {}
    for name, ckpt in heldout_ckpts.items():
        if Path(ckpt).is_file():
            heldout[name] = load_surrogate(ckpt)
        else:
            say(f"held-out classifier {name}: no clean run yet, left out")
    return method_export_stage(
        stage_dir,
        method,
        dm,
        eval_defenses,
        models[0],
        heldout,
        data_cfg=data_cfg,
        inference_per_class=inference_per_class,
        extra=extra,
    )


def export_clean_folder(folder: Path, data_cfg: dict) -> None:
    """Writes the clean training split as a PNG folder, unless a complete one is there."""
    from raeg_pl.io.protected import is_complete, write_image_folder

    if is_complete(folder):
        return
    dm = ImageClassificationDataModule(**data_cfg)
    dm.setup()
    write_image_folder(
        folder,
        dm.train_set.images,
        dm.train_set.labels,
        dm.classes,
        dm.train_files,
        kind="clean",
        extra={"data": data_cfg},
    )


def run_export(runner: StageRunner, protector_ckpt: Path, surrogate_ckpts: list[Path]) -> dict:
    """The pipeline's ``export`` stage: RAEG on the training split, measured from the files."""
    eval_defenses = list(runner.cfg.get("eval_defenses") or DEFAULT_EVAL_DEFENSES)
    settings = export_settings(runner.cfg)

    def run(stage_dir):
        return export_stage(
            stage_dir,
            protector_ckpt,
            surrogate_ckpts[0],
            runner.data_cfg,
            eval_defenses,
            runner.run_dir,
            refine_steps=settings["refine_steps"],
        )

    recipe = {
        "stage": "export",
        "data": runner.data_cfg,
        "eval_defenses": eval_defenses,
        "upstream": [runner.recipes.get(stage_of(p)) for p in (protector_ckpt, surrogate_ckpts[0])],
    }
    if settings["refine_steps"]:  # the plain export's recipe (and hash) stays as it was
        recipe["export"] = settings
    return runner.run_stage("export", run, recipe)


__all__ = [
    "accuracy",
    "export_clean_folder",
    "export_method",
    "export_stage",
    "method_export_stage",
    "run_export",
]
