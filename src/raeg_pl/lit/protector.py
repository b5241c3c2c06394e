"""LightningModule that trains the RAEG protector against a frozen surrogate ensemble."""

from __future__ import annotations

import copy
import inspect
import math
from collections import OrderedDict
from pathlib import Path

import lightning as L
import torch
import torchvision.utils as vutils
from torchmetrics.classification import MulticlassAccuracy

from raeg_pl.defenses import Defense, DefenseCurriculum, get_defense
from raeg_pl.defenses.ops import jpeg_kept_share
from raeg_pl.defenses.pirate import PIRATE_DEFENSES, class_pattern_removal, parse_pirate_defense
from raeg_pl.losses import (
    RANGE_LOSSES,
    PSNRController,
    fidelity_loss,
    keep_classifiable_loss,
    label_permutation,
    lost_to_storage,
    psnr,
    quantize_ste,
    range_penalty,
    recovery_loss,
    targeted_adversarial_loss,
    targeted_labels,
    untargeted_adversarial_loss,
)
from raeg_pl.losses.inverse_adversary import InverseAdversary
from raeg_pl.losses.unrolled import UnrolledPirate
from raeg_pl.metrics import ImageQuality, classmean_share, from_uint8, to_uint8
from raeg_pl.models.encdec import GENERATORS, create_protector

DEFAULT_TRAIN_DEFENSES = (
    "jpeg:q=90",
    "gray",
    "jpeg:q=75",
    "blur:sigma=1",
    "resize:0.5",
    "noise:std=0.016",
    "median:k=3",
    "bits:5",
    "jpeg:q=50",
)
DEFAULT_EVAL_DEFENSES = ("identity", "jpeg:q=75", "gray")


class LabelledTrainingDefense:
    """A pirate's label-using defence in the protector's curriculum: class-pattern removal.

    ``classpattern[:sigma=S]`` (the pirate defence of that name, same parameters): the
    batch's class patterns are estimated from the stored batch and its labels and removed
    (:func:`~raeg_pl.defenses.pirate.class_pattern_removal`), then stored as 8-bit with
    straight-through rounding, as the pirate stores its cleaned images.

    Args:
        spec: a ``classpattern`` pirate-defence spec.
    """

    is_identity = False

    def __init__(self, spec: str) -> None:
        self.pirate = parse_pirate_defense(spec)
        if self.pirate.name != "classpattern":
            raise ValueError(f"train defence {spec!r}: only classpattern uses the labels")

    def __str__(self) -> str:
        return self.pirate.spec

    def __repr__(self) -> str:
        return f"LabelledTrainingDefense({self.pirate.spec!r})"

    def differentiable(
        self, x: torch.Tensor, labels: torch.Tensor, num_classes: int
    ) -> torch.Tensor:
        """(B, C, H, W) in [0, 1] and (B,) labels -> the cleaned batch, on the 8-bit grid."""
        sigma = float(self.pirate.params["sigma"])
        return quantize_ste(class_pattern_removal(x, labels, num_classes, sigma))


def parse_train_defense(spec: str | Defense) -> Defense | LabelledTrainingDefense:
    """One entry of ``train_defenses``: an image defence spec, or ``classpattern[:sigma=S]``.

    Raises:
        ValueError: naming the spec, for an unknown defence or a pirate defence the
            protector cannot simulate (only ``classpattern`` among them).
    """
    if isinstance(spec, str):
        name = spec.partition(":")[0].strip().lower()
        if PIRATE_DEFENSES.get(name) == "labelled":
            return LabelledTrainingDefense(spec)
        if name in PIRATE_DEFENSES:
            raise ValueError(
                f"train defence {spec!r}: the pirate defence {name!r} cannot be simulated in "
                "training; use an image defence or classpattern"
            )
    return get_defense(spec)


#: Surrogates loaded last, by checkpoint file (path, modification time, size): a grid builds
#: every row's protector and method on the same few surrogates, and building a network
#: (its random initialisation) costs many times more than copying a loaded one.
_LOADED_SURROGATES: OrderedDict[tuple[str, int, int], torch.nn.Module] = OrderedDict()
_LOADED_SURROGATES_KEPT = 4


def load_surrogate(path: str | Path) -> torch.nn.Module:
    """A frozen classifier (eval mode, no gradients) from a ``ClassifierLitModule`` checkpoint.

    Every call returns a network of its own (a copy of the one last loaded from the same,
    unchanged file).
    """
    from raeg_pl.lit.classifier import ClassifierLitModule

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: surrogate checkpoint not found")
    stat = path.stat()
    key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    model = _LOADED_SURROGATES.get(key)
    if model is None:
        lit = ClassifierLitModule.load_from_checkpoint(path, map_location="cpu")
        model = lit.model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        model.num_classes = lit.hparams.num_classes
        _LOADED_SURROGATES[key] = model
        while len(_LOADED_SURROGATES) > _LOADED_SURROGATES_KEPT:
            _LOADED_SURROGATES.popitem(last=False)
    _LOADED_SURROGATES.move_to_end(key)
    return copy.deepcopy(model)


# The optional loss terms and their settings. At their defaults (a term off, or a setting a
# term that is off never reads) they change nothing a fit does, so a recipe that names one at
# its default is the recipe that leaves it out: a config may switch a term off explicitly, or
# a term may be added to the code, without changing the hash of any fit that does not use it.
OPTIONAL_TERM_ARGS = (
    "l_classmean",
    "l_jpegkeep",
    "jpegkeep_quality",
    "l_unroll",
    "unroll_steps",
    "unroll_lr",
    "unroll_width",
    "unroll_reset",
    "l_volume",
    "l_invadv",
    "invadv_lr",
    "invadv_steps",
    "invadv_refit_every",
    "invadv_refit_steps",
    "invadv_refit_pairs",
)


def recipe_model_args(model: dict) -> dict:
    """``model`` (ProtectorLitModule arguments) without the optional terms' defaults.

    >>> recipe_model_args({"l_adv": 0.1, "l_invadv": 0.0, "invadv_steps": 1, "l_volume": 0.4})
    {'l_adv': 0.1, 'l_volume': 0.4}
    """
    params = inspect.signature(ProtectorLitModule.__init__).parameters
    return {
        k: v for k, v in model.items() if not (k in OPTIONAL_TERM_ARGS and v == params[k].default)
    }


def recipe_protector_spec(spec: dict) -> dict:
    """A protector spec (``{"model": {...}, ...}``) as its recipe records it: the model
    arguments through :func:`recipe_model_args`; a spec without a model dict as it is."""
    if not isinstance(spec.get("model"), dict):
        return spec
    return {**spec, "model": recipe_model_args(spec["model"])}


class ProtectorLitModule(L.LightningModule):
    """Trains the protector: the invertible one, or the encoder-decoder ablation baseline.

    See docs/raeg-method.md, sections 2, 3 and 4 (item 7).

    Objective per batch, on images ``x`` (B, C, H, W) in [0, 1] with labels ``y``::

        x_p = G(x);  x_q = Q(x_p)  (straight-through 8-bit storage);  x_r = G^-1(x_q)
        L = l_img * MSE(x_p, x) + l_rec * MSE(x_r, x) + l_adv * L_adv(f(D(x_q)), y)
          + l_keep * CE(f(x_r), y) + l_range * out_of_range(x_p)
          + l_classmean * share(x_q - x, y) + l_jpegkeep * (1 - kept_q(x_q - x))
          + l_unroll * margin(P_k(D(x_q)), x, y)

    ``f`` is one member of the frozen surrogate ensemble (members alternate per step), ``D`` a
    differentiable defence drawn from a curriculum that starts at identity and widens (an
    image defence, or the pirate's class-pattern removal, which also takes the labels);
    ``share`` is the fraction of the batch perturbation's energy in its class means
    (:func:`~raeg_pl.metrics.perturbation.classmean_share`); ``kept_q`` the share of its
    energy that JPEG at quality ``q`` keeps (:func:`~raeg_pl.defenses.ops.jpeg_kept_share`:
    luma at low frequencies); ``margin(P_k(.), x, y)`` the capped margin, on clean images of
    the batch, of a small pirate after ``k`` SGD steps on the other half of the defended
    stored batch (:func:`~raeg_pl.losses.unrolled.unrolled_pirate_loss`). The
    first ``warmup_steps`` train reversibility and fidelity only; ``l_adv`` then ramps up over
    ``adv_ramp_steps`` and drops tenfold for batches whose images are almost all past the cap.
    A PSNR controller steers ``l_img`` toward ``psnr_target``.

    Args:
        surrogate_checkpoints: ``ClassifierLitModule`` checkpoints of the surrogates.
        generator: the protector network: ``"invertible"`` (the Haar-wavelet invertible
            U-Net, :class:`~raeg_pl.models.protector.InvertibleProtector`) or ``"encdec"``
            (the ablation's plain encoder U-Net plus a separately learned decoder U-Net,
            :class:`~raeg_pl.models.encdec.EncoderDecoderProtector`, whose recovery is
            trained by the ``l_rec`` term instead of being exact).
        in_channels: image channels.
        levels: Haar levels of the protector (stride-2 downsamplings for ``"encdec"``).
        blocks_per_level: coupling blocks per level and path (residual blocks for
            ``"encdec"``).
        hidden_channels: width of the coupling sub-networks (minimum U-Net width for
            ``"encdec"``).
        clamp: soft clamp of the coupling log-scales (``"invertible"`` only).
        label_conditioned: condition the generator (either kind) on the class label (a design
            option beyond the paper, see :class:`~raeg_pl.models.protector.InvertibleProtector`);
            protecting and restoring then need the labels.
        cond_channels: width of the label embedding when ``label_conditioned``.
        lr: Adam learning rate (linear warm-up, then cosine-decayed over training).
        lr_warmup_steps: steps of the linear learning-rate warm-up. The generator starts at
            the identity, where full-size Adam steps move it in a random direction and spend
            the distortion budget on noise before the fidelity term pulls it back.
        adam_eps: Adam's epsilon. At the identity initialisation the gradients are rounding
            noise (~1e-10); Adam's scale invariance would turn them into full-size random
            steps with the usual 1e-8, so the generator would drift before any signal.
        l_img: initial fidelity weight (steered by the controller when ``psnr_target`` is set).
        l_rec: recovery weight.
        l_adv: adversarial weight after the ramp.
        l_keep: keep-classifiable weight on recovered images.
        l_range: weight of the range term on the values before storage.
        range_loss: its form: ``"quadratic"`` (:func:`~raeg_pl.losses.out_of_range_penalty`)
            or ``"hinge"`` (:func:`~raeg_pl.losses.range_hinge_penalty`, linear, which keeps
            what the generator adds on saturated pixels from being clipped by storage).
        range_margin: the hinge's margin inside [0, 1] (``"hinge"`` only).
        adv_mode: ``"targeted"`` (fixed label derangement) or ``"untargeted"``.
        adv_kind: untargeted loss form, ``"margin"`` or ``"capped_ce"``.
        kappa: cap of the adversarial margin, in logits.
        target_seed: seed of the label derangement of the targeted mode.
        psnr_target: target PSNR (dB) of the stored protected images; None disables the
            controller.
        controller_rate: gain of the controller per dB of error.
        warmup_steps: steps without the adversarial term.
        adv_ramp_steps: steps over which ``l_adv`` rises from 0 to its value.
        cap_fraction: share of capped images in a batch above which ``l_adv`` is cut tenfold.
        l_classmean: weight of the class-mean share of the batch perturbation (0: off), a
            term against one pattern per class, which a pirate holding the labels removes.
            Counted, like ``l_adv``, only once the adversarial term is on: before, the
            perturbation is rounding noise.
        l_jpegkeep: weight of the share of the batch perturbation's energy that JPEG at
            ``jpegkeep_quality`` would remove (0: off): moves the perturbation's energy
            toward what a pirate's JPEG keeps, at the same PSNR. Counted, like
            ``l_classmean``, once the adversarial term is on.
        jpegkeep_quality: the JPEG quality whose quantisation tables weigh the frequencies
            (the quick robustness grid's worst case is JPEG-10).
        l_unroll: weight of the unrolled pirate (0: off;
            :class:`~raeg_pl.losses.unrolled.UnrolledPirate`): a small network takes
            ``unroll_steps`` SGD steps of size ``unroll_lr`` on half of the stored (and
            defended) batch and is scored on the clean other half; the protector minimises
            its capped margin. Counted once the adversarial term is on. The pirate is
            ``unroll_width`` channels wide, trains one step per batch on the protected
            batch and starts again from new weights every ``unroll_reset`` steps (it is not
            in the checkpoint: a resumed fit starts a new one).
        l_invadv: weight of the learned-inverse pirate (0: off;
            :class:`~raeg_pl.losses.inverse_adversary.InverseAdversary`): a small label-aware
            network takes ``invadv_steps`` Adam steps (rate ``invadv_lr``) per batch on the
            stored images and their originals, as a pirate with leaked pairs does, and the
            protector is scored by the adversarial loss on the surrogate after that network
            has undone what it can. Counted once the adversarial term is on. Its state
            travels in the checkpoint. With ``invadv_refit_every`` N > 0 it is also fitted
            afresh every N steps to the last ``invadv_refit_pairs`` pairs it saw, for
            ``invadv_refit_steps`` steps, as the grid's learned-inverse pirate fits a
            finished protector's pairs (0: never).
        l_volume: weight of the bits per value that storing the protected image in 8 bits
            loses (0: off): ``max(0, -log|det dG/dx|) / (C H W)`` (nats), from
            :meth:`~raeg_pl.models.protector.InvertibleProtector.forward_log_det`. A
            generator that shrinks volume maps many 8-bit originals to one stored file; what
            they differ by is what restore cannot recover and what a lossless sidecar must
            carry. Counted from the first step (``"invertible"`` only).
        train_defenses: defence specs of the curriculum, easiest first (empty: none): image
            defence specs (``"jpeg_random:qmin=10,qmax=95"``, ``"gray"``...) and
            ``"classpattern[:sigma=S]"`` (:class:`LabelledTrainingDefense`).
        defense_full_at: training progress at which the whole curriculum is in use.
        eval_defenses: real defences under which surrogate accuracy is reported.
        explode_threshold: a loss of larger magnitude counts as an explosion.
        grid_images: images per side of the saved validation grid (0 disables).
    """

    def __init__(
        self,
        surrogate_checkpoints: list[str],
        generator: str = "invertible",
        in_channels: int = 3,
        levels: int = 2,
        blocks_per_level: int = 2,
        hidden_channels: int = 32,
        clamp: float = 1.0,
        label_conditioned: bool = False,
        cond_channels: int = 8,
        lr: float = 1e-3,
        lr_warmup_steps: int = 0,
        adam_eps: float = 1e-6,
        l_img: float = 1.2,
        l_rec: float = 1.0,
        l_adv: float = 0.02,
        l_keep: float = 0.001,
        l_range: float = 10.0,
        range_loss: str = "quadratic",
        range_margin: float = 0.0,
        l_classmean: float = 0.0,
        l_jpegkeep: float = 0.0,
        jpegkeep_quality: int = 10,
        l_unroll: float = 0.0,
        l_volume: float = 0.0,
        unroll_steps: int = 2,
        unroll_lr: float = 0.1,
        unroll_width: int = 16,
        unroll_reset: int = 250,
        l_invadv: float = 0.0,
        invadv_lr: float = 3e-3,
        invadv_steps: int = 1,
        invadv_refit_every: int = 0,
        invadv_refit_steps: int = 1000,
        invadv_refit_pairs: int = 1000,
        adv_mode: str = "targeted",
        adv_kind: str = "margin",
        kappa: float = 5.0,
        target_seed: int = 0,
        psnr_target: float | None = 33.0,
        controller_rate: float = 0.02,
        warmup_steps: int = 50,
        adv_ramp_steps: int = 100,
        cap_fraction: float = 0.9,
        train_defenses: list[str] = list(DEFAULT_TRAIN_DEFENSES),  # noqa: B006 - typed CLI default
        defense_full_at: float = 0.6,
        eval_defenses: list[str] = list(DEFAULT_EVAL_DEFENSES),  # noqa: B006 - typed CLI default
        explode_threshold: float = 100.0,
        grid_images: int = 8,
    ) -> None:
        super().__init__()
        if adv_mode not in ("targeted", "untargeted"):
            raise ValueError(f"adv_mode must be 'targeted' or 'untargeted', got {adv_mode!r}")
        if range_loss not in RANGE_LOSSES:
            raise ValueError(f"range_loss must be one of {RANGE_LOSSES}, got {range_loss!r}")
        if generator not in GENERATORS:
            raise ValueError(f"generator must be one of {GENERATORS}, got {generator!r}")
        if not surrogate_checkpoints:
            raise ValueError("at least one surrogate checkpoint is needed")
        self.save_hyperparameters()
        # Kept out of the state dict: the protector checkpoint must not carry the surrogates.
        self._surrogates = [load_surrogate(p) for p in surrogate_checkpoints]
        self.num_classes = int(self._surrogates[0].num_classes)
        self.protector = create_protector(
            generator,
            in_channels,
            levels,
            blocks_per_level,
            hidden_channels,
            clamp,
            num_classes=self.num_classes if label_conditioned else 0,
            cond_channels=cond_channels,
        )
        self.register_buffer(
            "permutation", label_permutation(self.num_classes, target_seed), persistent=True
        )
        if l_classmean < 0:
            raise ValueError(f"l_classmean must be >= 0, got {l_classmean}")
        if l_jpegkeep < 0:
            raise ValueError(f"l_jpegkeep must be >= 0, got {l_jpegkeep}")
        if not 1 <= jpegkeep_quality <= 100:
            raise ValueError(f"jpegkeep_quality must be in [1, 100], got {jpegkeep_quality}")
        if l_unroll < 0:
            raise ValueError(f"l_unroll must be >= 0, got {l_unroll}")
        if l_volume < 0:
            raise ValueError(f"l_volume must be >= 0, got {l_volume}")
        if l_volume and not hasattr(self.protector, "forward_log_det"):
            raise ValueError(
                f"l_volume needs a generator with a tractable Jacobian ('invertible'), "
                f"got {generator!r}"
            )
        # Checked (its arguments) whether on or off, so a bad setting fails at once.
        pirate = UnrolledPirate(
            in_channels,
            self.num_classes,
            width=unroll_width,
            steps=unroll_steps,
            lr=unroll_lr,
            reset=unroll_reset,
            seed=target_seed,
        )
        self._unrolled = pirate if l_unroll > 0 else None
        if l_invadv < 0 or invadv_lr <= 0 or invadv_steps < 1:
            raise ValueError(
                "need l_invadv >= 0, invadv_lr > 0 and invadv_steps >= 1, got "
                f"{l_invadv}, {invadv_lr} and {invadv_steps}"
            )
        if invadv_refit_every < 0 or invadv_refit_steps < 1 or invadv_refit_pairs < 1:
            raise ValueError(
                "need invadv_refit_every >= 0, invadv_refit_steps >= 1 and invadv_refit_pairs "
                f">= 1, got {invadv_refit_every}, {invadv_refit_steps} and {invadv_refit_pairs}"
            )
        # Built at the first training step, when the image size is known.
        self._inverse_adv: InverseAdversary | None = None
        self._inverse_adv_state: dict | None = None
        self.curriculum = DefenseCurriculum(
            train_defenses, full_at=defense_full_at, parse=parse_train_defense
        )
        self.eval_defenses = [get_defense(s) for s in eval_defenses]
        self.controller = PSNRController(
            weight=l_img, target_psnr=psnr_target or 0.0, rate=controller_rate
        )
        self.quality_protected = ImageQuality()
        self.quality_recovered = ImageQuality()
        self.acc_clean = MulticlassAccuracy(self.num_classes, average="micro")
        self.acc_protected = torch.nn.ModuleDict(
            {
                self._key(d): MulticlassAccuracy(self.num_classes, average="micro")
                for d in self.eval_defenses
            }
        )
        self.target_hits = MulticlassAccuracy(self.num_classes, average="micro")
        self._last_good: dict | None = None
        self.recoveries = 0

    @staticmethod
    def _key(defense) -> str:
        return "none" if defense.is_identity else str(defense).replace(":", "_").replace("=", "")

    # -------------------------------------------------------------------- plumbing
    def _move_surrogates(self) -> None:
        for s in self._surrogates:
            s.to(self.device)

    def on_fit_start(self) -> None:
        self._move_surrogates()

    def on_validation_start(self) -> None:
        self._move_surrogates()

    def on_test_start(self) -> None:
        self._move_surrogates()

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Protected images (B, C, H, W) float, before 8-bit storage (labels: when the
        generator is label-conditioned)."""
        return self.protector(images, labels)

    def inverse(self, protected: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Recovered images (B, C, H, W) float from protected (stored) images."""
        return self.protector.inverse(protected, labels)

    def _adv_targets(self, labels: torch.Tensor) -> torch.Tensor:
        return targeted_labels(labels, self.permutation)

    def _adv_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        hp = self.hparams
        if hp.adv_mode == "targeted":
            return targeted_adversarial_loss(
                logits, self._adv_targets(labels), kappa=hp.kappa, reduction="none"
            )
        return untargeted_adversarial_loss(
            logits, labels, kappa=hp.kappa, kind=hp.adv_kind, reduction="none"
        )

    def adv_weight(self, step: int) -> float:
        """l_adv after warm-up and ramp at a global step."""
        hp = self.hparams
        if step < hp.warmup_steps:
            return 0.0
        return hp.l_adv * min(1.0, (step - hp.warmup_steps + 1) / max(1, hp.adv_ramp_steps))

    # -------------------------------------------------------------------- training
    def training_step(self, batch, batch_idx: int):
        hp = self.hparams
        images, labels = batch
        step = self.global_step
        log_det = getattr(self.protector, "forward_log_det", None)
        if log_det is not None:
            protected, log_det = log_det(images, labels)
            lost = lost_to_storage(log_det, images[0].numel())
        else:
            protected, lost = self.protector(images, labels), None
        stored = quantize_ste(protected)
        recovered = self.protector.inverse(stored, labels)
        l_fid = fidelity_loss(protected, images)
        l_rec = recovery_loss(recovered, images)
        l_range = range_penalty(protected, hp.range_loss, hp.range_margin)
        w_img = self.controller.weight if hp.psnr_target else hp.l_img
        loss = w_img * l_fid + hp.l_rec * l_rec + hp.l_range * l_range
        if hp.l_volume > 0:
            loss = loss + hp.l_volume * lost
        if lost is not None:
            # Bits per value that 8-bit storage loses (see ``l_volume``).
            self.log("train/lost_bits", lost.detach() / math.log(2))
        w_adv = self.adv_weight(step)
        # Logged always; differentiated only when it is a loss term.
        penalise = hp.l_classmean > 0 and w_adv > 0
        with torch.set_grad_enabled(penalise and torch.is_grad_enabled()):
            share = classmean_share(stored - images, labels, self.num_classes)
        if penalise:
            loss = loss + hp.l_classmean * share
        penalise_kept = hp.l_jpegkeep > 0 and w_adv > 0
        with torch.set_grad_enabled(penalise_kept and torch.is_grad_enabled()):
            kept = jpeg_kept_share(stored - images, hp.jpegkeep_quality)
        if penalise_kept:
            loss = loss + hp.l_jpegkeep * (1 - kept)
        if w_adv > 0:
            surrogate = self._surrogates[step % len(self._surrogates)]
            progress = step / max(1, self.trainer.estimated_stepping_batches)
            defense = self.curriculum.sample(progress)
            if isinstance(defense, LabelledTrainingDefense):
                attacked = defense.differentiable(stored, labels, self.num_classes)
            else:
                attacked = defense.differentiable(stored)
            per_image = self._adv_loss(surrogate(attacked), labels)
            # Decided on the global batch, so every DDP rank weights the loss alike.
            capped = self._global_mean((per_image <= -hp.kappa + 1e-6).float().mean())
            if capped >= hp.cap_fraction:
                w_adv = w_adv / 10
            l_adv = per_image.mean()
            l_keep = keep_classifiable_loss(surrogate(recovered), labels)
            loss = loss + w_adv * l_adv + hp.l_keep * l_keep
            self.log_dict(
                {"train/l_adv": l_adv, "train/capped_fraction": capped, "train/l_keep": l_keep}
            )
            if self._unrolled is not None:
                l_unroll = self._unrolled.loss(attacked, images, labels, hp.kappa)
                loss = loss + hp.l_unroll * l_unroll
                self.log("train/l_unroll", l_unroll.detach())
            if hp.l_invadv > 0:
                pirate = self.inverse_adversary(images)
                fit_mse = pirate.update(stored, images, labels)
                undone = pirate.undo(stored, labels)
                l_invadv = self._adv_loss(surrogate(undone), labels).mean()
                loss = loss + hp.l_invadv * l_invadv
                logged = {
                    "train/l_invadv": l_invadv.detach(),
                    "train/invadv_psnr": -10 * math.log10(max(fit_mse, 1e-12)),
                }
                if pirate.refit_psnr is not None:
                    logged["train/invadv_refit_psnr"] = pirate.refit_psnr
                self.log_dict(logged)
        if not self._loss_is_sane(loss):
            return None
        measured = float(self._global_mean(psnr(stored.detach(), images)))
        # The controller only acts once the adversarial term is on: during the warm-up the
        # generator is near the identity and would drive l_img towards zero, letting the
        # images drift by noise that spends the distortion budget before any attack starts.
        if hp.psnr_target and w_adv > 0:
            self.controller.update(measured)
        self.log_dict(
            {
                "train/loss": loss,
                "train/l_fid": l_fid,
                "train/l_rec": l_rec,
                "train/l_range": l_range,
                "train/psnr_protected": measured,
                "train/w_img": w_img,
                "train/w_adv": w_adv,
                "train/classmean_share": share.detach(),
                "train/jpeg_kept_share": kept.detach(),
            },
            prog_bar=False,
        )
        self.log("train/psnr", measured, prog_bar=True, logger=False)
        return loss

    def _global_mean(self, value: torch.Tensor) -> torch.Tensor:
        """Mean of a scalar over DDP ranks (itself on one process)."""
        if self.trainer.world_size > 1:
            return self.trainer.strategy.reduce(value.detach().float(), reduce_op="mean")
        return value.detach()

    def _loss_is_sane(self, loss: torch.Tensor) -> bool:
        """NaN/explosion guard: restore the last good weights with half the learning rate.

        An explosion is a loss whose magnitude passes ``explode_threshold``; a relative test
        would fire when the adversarial term first switches on after a near-zero warm-up.
        """
        value = float(loss.detach())
        bad = not (math.isfinite(value) and abs(value) <= self.hparams.explode_threshold)
        # Collective: a rank that skipped the step alone would leave the others waiting in
        # the gradient all-reduce.
        if not self._global_mean(torch.tensor(float(bad), device=self.device)) > 0:
            return True
        self.recoveries += 1
        if self._last_good is not None:
            self.protector.load_state_dict(self._last_good)
        for opt in self.trainer.optimizers:
            for group in opt.param_groups:
                group["lr"] *= 0.5
            opt.state.clear()
        for cfg in self.trainer.lr_scheduler_configs:
            cfg.scheduler.base_lrs = [lr * 0.5 for lr in cfg.scheduler.base_lrs]
        self.log("train/recoveries", float(self.recoveries))
        return False

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if batch_idx % 50 == 0:
            self._last_good = copy.deepcopy(self.protector.state_dict())

    # -------------------------------------------------------------------- evaluation
    def _evaluate(self, batch, batch_idx: int, stage: str) -> None:
        images, labels = batch
        stored = from_uint8(to_uint8(self.protector(images, labels)))  # real 8-bit storage
        recovered = from_uint8(to_uint8(self.protector.inverse(stored, labels)))
        self.quality_protected.update(stored, images)
        self.quality_recovered.update(recovered, images)
        surrogate = self._surrogates[0]
        self.acc_clean(surrogate(images), labels)
        for d in self.eval_defenses:
            self.acc_protected[self._key(d)](surrogate(d.real(stored)), labels)
        self.target_hits(surrogate(stored), self._adv_targets(labels))
        if batch_idx == 0 and stage == "val":
            self._save_grid(images, stored, recovered)

    def _log_eval(self, stage: str) -> None:
        qp = self.quality_protected.compute()
        qr = self.quality_recovered.compute()
        logs = {
            f"{stage}/psnr_protected": qp["psnr"],
            f"{stage}/ssim_protected": qp["ssim"],
            f"{stage}/linf_protected": qp["linf"],
            f"{stage}/psnr_recovered": qr["psnr"],
            f"{stage}/ssim_recovered": qr["ssim"],
            f"{stage}/exact_pixel_rate_recovered": qr["exact_pixel_rate"],
            f"{stage}/surrogate_acc_clean": self.acc_clean.compute(),
            f"{stage}/target_hit_rate": self.target_hits.compute(),
        }
        for key, metric in self.acc_protected.items():
            logs[f"{stage}/surrogate_acc_protected/{key}"] = metric.compute()
        self.log_dict({k: v.float() for k, v in logs.items()}, sync_dist=False)
        for m in (
            self.quality_protected,
            self.quality_recovered,
            self.acc_clean,
            self.target_hits,
            *self.acc_protected.values(),
        ):
            m.reset()

    def validation_step(self, batch, batch_idx: int) -> None:
        self._evaluate(batch, batch_idx, "val")

    def on_validation_epoch_end(self) -> None:
        self._log_eval("val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._evaluate(batch, batch_idx, "test")

    def on_test_epoch_end(self) -> None:
        self._log_eval("test")

    def _save_grid(self, images, stored, recovered) -> None:
        n = self.hparams.grid_images
        if not n or self.trainer.sanity_checking or not self.trainer.is_global_zero:
            return
        n = min(n, len(images))
        diff = ((stored[:n] - images[:n]) * 10 + 0.5).clamp(0, 1)  # difference amplified 10x
        grid = vutils.make_grid(
            torch.cat([images[:n], stored[:n], diff, recovered[:n]]).float().cpu(),
            nrow=n,
            padding=1,
        )
        root = Path(self.trainer.log_dir or self.trainer.default_root_dir) / "grids"
        root.mkdir(parents=True, exist_ok=True)
        vutils.save_image(grid, root / f"epoch_{self.current_epoch:03d}.png")
        for logger in self.loggers:
            if hasattr(logger, "log_image"):
                logger.log_image(
                    "val/grid",
                    [grid],
                    step=self.global_step,
                    caption=["original / protected / 10x difference / recovered"],
                )

    def inverse_adversary(self, images: torch.Tensor) -> InverseAdversary:
        """The learned-inverse pirate of ``l_invadv`` (built for ``images``' size at first
        use, from the checkpoint's state when the fit resumes)."""
        if self._inverse_adv is None:
            pirate = InverseAdversary(
                images.shape[1],
                self.num_classes,
                tuple(images.shape[-2:]),
                lr=self.hparams.invadv_lr,
                seed=self.hparams.target_seed,
                steps=self.hparams.invadv_steps,
                refit_every=self.hparams.invadv_refit_every,
                refit_steps=self.hparams.invadv_refit_steps,
                refit_pairs=self.hparams.invadv_refit_pairs,
            )
            pirate.to(images.device)
            if self._inverse_adv_state is not None:
                # Optimizer.load_state_dict puts the moments on the parameters' device.
                pirate.load_state_dict(self._inverse_adv_state)
            self._inverse_adv = pirate
        return self._inverse_adv

    def configure_optimizers(self):
        opt = torch.optim.Adam(
            self.protector.parameters(), lr=self.hparams.lr, eps=self.hparams.adam_eps
        )
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warm = max(0, int(self.hparams.lr_warmup_steps))

        def factor(s: int) -> float:
            cosine = 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / total)))
            return cosine * min(1.0, (s + 1) / warm) if warm else cosine

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # -------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["psnr_controller"] = self.controller.state_dict()
        checkpoint["protector_config"] = self.protector.config
        checkpoint["protector_fingerprint"] = self.protector.fingerprint()
        if self._inverse_adv is not None:
            checkpoint["inverse_adversary"] = self._inverse_adv.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "psnr_controller" in checkpoint:
            self.controller.load_state_dict(checkpoint["psnr_controller"])
        self._inverse_adv_state = checkpoint.get("inverse_adversary")
        self._inverse_adv = None
