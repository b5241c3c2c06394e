"""Protector training steps with the levers on: random-quality JPEG and class-pattern removal
in the curriculum, the class-mean share penalty and the unrolled pirate. Random images, an
untrained surrogate: no data, a few seconds on a CPU."""

from __future__ import annotations

import math
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from raeg_pl.lit.protector import LabelledTrainingDefense, ProtectorLitModule
from raeg_pl.losses import lost_to_storage
from raeg_pl.metrics import classmean_share
from raeg_pl.stages.check import build_classifier, save_classifier_checkpoint

CLASSES = 3
LEVERS = {
    "train_defenses": [
        "jpeg_random:qmin=10,qmax=95",
        "gray",
        "blur:sigma=1",
        "median:k=3",
        "resize:0.5",
        "noise:std=0.016",
        "bits:5",
        "classpattern",
    ],
    "defense_full_at": 0.01,
    "l_classmean": 1e-3,
    "l_unroll": 1e-3,
    "unroll_width": 4,
    "l_invadv": 1e-3,
}


@pytest.fixture(scope="module")
def surrogate(tmp_path_factory):
    torch.manual_seed(0)
    lit = build_classifier({"arch": "resnet_tiny_cifar"}, CLASSES, 3)
    return save_classifier_checkpoint(lit, tmp_path_factory.mktemp("surrogate") / "s.ckpt")


def batch(n: int = 12):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 16, 16), generator=g).float() / 255
    return images, torch.arange(n) % CLASSES


def module(surrogate, **kwargs) -> ProtectorLitModule:
    torch.manual_seed(0)
    model = ProtectorLitModule(
        [str(surrogate)],
        label_conditioned=True,
        psnr_target=33.0,
        warmup_steps=0,
        adv_ramp_steps=1,
        eval_defenses=["none"],
        grid_images=0,
        **kwargs,
    )
    # Off the identity, so the perturbation (and its class-mean share) is not zero.
    with torch.no_grad():
        for p in model.protector.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


def bare_step(model: ProtectorLitModule, images, labels, defense) -> tuple[torch.Tensor, dict]:
    """One ``training_step`` without a Trainer, the curriculum fixed to ``defense``."""
    logged: dict = {}
    model._trainer = SimpleNamespace(global_step=0, world_size=1, estimated_stepping_batches=10)
    model.log = lambda *a, **k: None
    model.log_dict = lambda d, **k: logged.update(d)
    model.curriculum.sample = lambda progress, generator=None: defense
    return model.training_step((images, labels), 0), logged


def test_every_curriculum_defence_trains_the_protector(surrogate):
    images, labels = batch()
    model = module(surrogate, **LEVERS)
    kinds = [type(d) for d in model.curriculum.defenses]
    assert LabelledTrainingDefense in kinds
    for defense in model.curriculum.defenses:
        model.zero_grad()
        loss, logged = bare_step(model, images, labels, defense)
        assert torch.isfinite(loss), str(defense)
        loss.backward()
        grads = [p.grad for p in model.protector.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads), str(defense)
        assert sum(float(g.abs().sum()) for g in grads) > 0, str(defense)
        assert 0 < float(logged["train/classmean_share"]) <= 1


def test_classmean_penalty_adds_its_weighted_share_and_nothing_when_off(surrogate):
    images, labels = batch()
    identity = module(surrogate).curriculum.identity
    on, logged = bare_step(module(surrogate, l_classmean=0.5), images, labels, identity)
    off, logged_off = bare_step(module(surrogate, l_classmean=0.0), images, labels, identity)
    share = float(logged["train/classmean_share"])
    assert share == pytest.approx(float(logged_off["train/classmean_share"]))
    assert float(on.detach()) - float(off.detach()) == pytest.approx(0.5 * share, rel=1e-4)
    # The logged share is the one of the stored batch (measured here independently).
    model = module(surrogate)
    with torch.no_grad():
        stored = model.protector(images, labels)
        stored = stored + (torch.round(stored.clamp(0, 1) * 255) / 255 - stored)
    assert share == pytest.approx(float(classmean_share(stored - images, labels, CLASSES)))


@pytest.mark.parametrize("term", ["l_classmean", "l_jpegkeep", "l_unroll", "l_invadv"])
def test_penalty_gradient_reaches_the_protector(surrogate, term):
    images, labels = batch()
    identity = module(surrogate).curriculum.identity
    grads = []
    for weight in (0.0, 1.0):
        # The penalty counts once the adversarial term is on: same adversarial weight in both.
        model = module(surrogate, **{term: weight})
        loss, _ = bare_step(model, images, labels, identity)
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.protector.parameters()]))
    assert not torch.allclose(grads[0], grads[1])


def test_negative_classmean_weight_is_refused(surrogate):
    with pytest.raises(ValueError, match="l_classmean"):
        module(surrogate, l_classmean=-1.0)


def test_fit_with_all_levers_on_runs_and_logs_the_share(surrogate, tmp_path):
    images, labels = batch(24)
    model = module(surrogate, **LEVERS)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=4,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=str(tmp_path),
    )
    trainer.fit(model, DataLoader(TensorDataset(images, labels), batch_size=12))
    assert trainer.global_step == 4 and model.recoveries == 0
    metrics = trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss"])
    assert 0 < float(metrics["train/classmean_share"]) <= 1
    assert torch.isfinite(metrics["train/l_invadv"]) and float(metrics["train/invadv_psnr"]) > 0


def test_jpegkeep_penalty_adds_its_weighted_complement_and_nothing_when_off(surrogate):
    images, labels = batch()
    identity = module(surrogate).curriculum.identity
    on, logged = bare_step(module(surrogate, l_jpegkeep=0.5), images, labels, identity)
    off, logged_off = bare_step(module(surrogate), images, labels, identity)
    kept = float(logged["train/jpeg_kept_share"])
    assert 0 < kept < 1 and kept == pytest.approx(float(logged_off["train/jpeg_kept_share"]))
    assert float(on.detach()) - float(off.detach()) == pytest.approx(0.5 * (1 - kept), rel=1e-4)
    # Another quality weighs the frequencies with other tables.
    _, logged_90 = bare_step(
        module(surrogate, l_jpegkeep=0.5, jpegkeep_quality=90), images, labels, identity
    )
    assert float(logged_90["train/jpeg_kept_share"]) != pytest.approx(kept)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [({"l_jpegkeep": -1.0}, "l_jpegkeep"), ({"jpegkeep_quality": 0}, "jpegkeep_quality")],
)
def test_bad_jpegkeep_settings_are_refused(surrogate, kwargs, name):
    with pytest.raises(ValueError, match=name):
        module(surrogate, **kwargs)


def test_unrolled_pirate_adds_its_weighted_loss_and_trains_between_steps(surrogate):
    from raeg_pl.losses.unrolled import init_pirate_params, unrolled_pirate_loss

    images, labels = batch()
    identity = module(surrogate).curriculum.identity
    model = module(surrogate, l_unroll=0.5, unroll_steps=1, unroll_width=4)
    on, _ = bare_step(model, images, labels, identity)
    off, _ = bare_step(module(surrogate), images, labels, identity)
    # Its value, computed here independently: the pirate of seed ``target_seed`` (0) takes
    # one step on the stored first half and is scored on the clean second half.
    with torch.no_grad():
        stored = module(surrogate).protector(images, labels)
        stored = torch.round(stored.clamp(0, 1) * 255) / 255
    start = init_pirate_params(3, CLASSES, 4, torch.Generator().manual_seed(0))
    expected = unrolled_pirate_loss(start, stored[:6], labels[:6], images[6:], labels[6:], 1, 0.1)
    diff = float(on.detach()) - float(off.detach())
    assert diff == pytest.approx(0.5 * float(expected.detach()), rel=1e-3, abs=1e-5)
    # The pirate learnt from the batch: its weights moved from where they started.
    assert not torch.equal(model._unrolled.params[0].detach(), start[0].detach())


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"l_unroll": -1.0}, "l_unroll"),
        ({"unroll_steps": 0}, "steps"),
        ({"unroll_lr": 0.0}, "lr"),
        ({"unroll_reset": 0}, "reset"),
    ],
)
def test_bad_unroll_settings_are_refused(surrogate, kwargs, name):
    with pytest.raises(ValueError, match=name):
        module(surrogate, **kwargs)


def test_volume_term_adds_the_weighted_lost_bits_and_lowers_them(surrogate):
    images, labels = batch()
    identity = module(surrogate).curriculum.identity
    with torch.no_grad():  # the loss of storage, computed here from the Jacobian's log-det
        _, log_det = module(surrogate).protector.forward_log_det(images, labels)
    lost = float(lost_to_storage(log_det, images[0].numel()))
    assert lost > 0
    on, _ = bare_step(module(surrogate, l_volume=2.0), images, labels, identity)
    off, _ = bare_step(module(surrogate), images, labels, identity)
    assert float(on.detach()) - float(off.detach()) == pytest.approx(2.0 * lost, rel=1e-4)
    # Gradient steps on the term alone shrink what storage loses.
    model = module(surrogate, l_volume=1.0)
    opt = torch.optim.SGD(model.protector.parameters(), lr=0.5)
    for _ in range(3):
        opt.zero_grad()
        _, ld = model.protector.forward_log_det(images, labels)
        lost_to_storage(ld, images[0].numel()).backward()
        opt.step()
    with torch.no_grad():
        _, ld = model.protector.forward_log_det(images, labels)
    assert float(lost_to_storage(ld, images[0].numel())) < 0.5 * lost


def test_bad_volume_settings_are_refused(surrogate):
    with pytest.raises(ValueError, match="l_volume"):
        module(surrogate, l_volume=-1.0)
    with pytest.raises(ValueError, match="l_volume needs .*'encdec'"):
        module(surrogate, l_volume=1.0, generator="encdec")


def test_inverse_adversary_adds_its_weighted_loss_learns_and_is_not_trained_by_it(surrogate):
    """``l_invadv``: the learned-inverse pirate takes one step on the batch's pairs, the
    protector's loss gains ``l_invadv`` times the adversarial loss after it, and that loss
    trains the protector, never the pirate."""
    from raeg_pl.losses.inverse_adversary import InverseAdversary

    images, labels = batch()
    identity = module(surrogate).curriculum.identity
    model = module(surrogate, l_invadv=0.5)
    on, logged = bare_step(model, images, labels, identity)
    off, _ = bare_step(module(surrogate), images, labels, identity)
    assert module(surrogate)._inverse_adv is None  # off: no pirate is built
    # Its value, computed here independently: a pirate of the same seed takes one step on
    # the stored batch, then the surrogate scores what it makes of the stored images.
    with torch.no_grad():
        stored = module(surrogate).protector(images, labels)
        stored = torch.round(stored.clamp(0, 1) * 255) / 255
    pirate = InverseAdversary(3, CLASSES, (16, 16), seed=0)
    start = [p.detach().clone() for p in pirate.net.parameters()]
    mse = pirate.update(stored, images, labels)
    with torch.no_grad():
        adv = model._adv_loss(model._surrogates[0](pirate.undo(stored, labels)), labels).mean()
    diff = float(on.detach()) - float(off.detach())
    assert diff == pytest.approx(0.5 * float(adv), rel=1e-3, abs=1e-5)
    assert float(logged["train/l_invadv"]) == pytest.approx(float(adv), rel=1e-3, abs=1e-5)
    assert float(logged["train/invadv_psnr"]) == pytest.approx(-10 * math.log10(mse), rel=1e-4)
    # The pirate learnt from the batch; the protector's loss leaves its weights' gradients
    # as its own step left them.
    moved = [p.detach() for p in model._inverse_adv.net.parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(start, moved, strict=True))
    before = [p.grad.clone() for p in model._inverse_adv.net.parameters()]
    on.backward()
    after = [p.grad for p in model._inverse_adv.net.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))


def test_inverse_adversary_learns_pairs_and_travels_in_the_checkpoint(surrogate):
    from raeg_pl.losses.inverse_adversary import InverseAdversary

    images, labels = batch()
    stored = (images + 0.05 * torch.sin(torch.arange(16.0))).clamp(0, 1)
    pirate = InverseAdversary(3, CLASSES, (16, 16), lr=1e-2, seed=1)
    first = pirate.update(stored, images, labels)
    for _ in range(60):
        last = pirate.update(stored, images, labels)
    assert last < 0.2 * first  # it learns to undo a fixed change from the pairs
    model = module(surrogate, l_invadv=0.5)
    bare_step(model, images, labels, model.curriculum.identity)
    checkpoint: dict = {}
    model.on_save_checkpoint(checkpoint)
    resumed = module(surrogate, l_invadv=0.5)
    resumed.on_load_checkpoint(checkpoint)
    again = resumed.inverse_adversary(images)
    for a, b in zip(model._inverse_adv.net.parameters(), again.net.parameters(), strict=True):
        assert torch.equal(a, b)
    assert again.opt.state_dict()["state"]  # the optimiser's moments came back too
    with pytest.raises(ValueError, match="l_invadv"):
        module(surrogate, l_invadv=-1.0)
    with pytest.raises(ValueError, match="invadv_steps"):
        module(surrogate, l_invadv=0.5, invadv_steps=0)


def test_inverse_adversary_steps_per_batch(surrogate):
    """``invadv_steps``: the pirate takes that many Adam steps on each batch (the same
    weights as as many one-step updates), and the protector hands the setting on."""
    from raeg_pl.losses.inverse_adversary import InverseAdversary

    images, labels = batch()
    stored = (images + 0.05 * torch.cos(torch.arange(16.0))).clamp(0, 1)
    three = InverseAdversary(3, CLASSES, (16, 16), lr=1e-2, seed=2, steps=3)
    one = InverseAdversary(3, CLASSES, (16, 16), lr=1e-2, seed=2)
    last = three.update(stored, images, labels)
    for _ in range(3):
        before_last = one.update(stored, images, labels)
    for a, b in zip(three.net.parameters(), one.net.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    assert last == pytest.approx(before_last, rel=1e-5)
    model = module(surrogate, l_invadv=0.5, invadv_steps=4)
    bare_step(model, images, labels, model.curriculum.identity)
    assert model._inverse_adv.steps == 4
    assert model._inverse_adv.opt.state_dict()["state"][0]["step"] == 4
    with pytest.raises(ValueError, match="steps"):
        InverseAdversary(3, CLASSES, (16, 16), steps=0)


def test_inverse_adversary_refits_afresh_with_the_grids_fit(surrogate):
    """``refit_every``: the pirate keeps its last ``refit_pairs`` pairs in 8 bits and, every
    N updates once it holds that many, is replaced by the grid's own fit to them
    (:func:`fit_inverse`, seed + refit count); the counters travel in its state."""
    from raeg_pl.defenses.pirate import fit_inverse
    from raeg_pl.losses.inverse_adversary import WARM_STEPS, InverseAdversary
    from raeg_pl.utils.quantize import from_uint8, to_uint8

    images, labels = batch()
    stored = (images + 0.05 * torch.sin(torch.arange(16.0))).clamp(0, 1)
    stored = from_uint8(to_uint8(stored))
    pirate = InverseAdversary(
        3, CLASSES, (16, 16), lr=1e-2, seed=3, refit_every=2, refit_steps=40, refit_pairs=8
    )
    first_net = pirate.net
    pirate.update(stored[:6], images[:6], labels[:6])  # 6 pairs held: too few to fit
    pirate.update(stored[:6], images[:6], labels[:6])  # 12 held, 2 updates: due, but...
    assert pirate.refits == 1 and pirate.net is not first_net  # ...fitted on the last 8
    kept = pirate._pairs
    assert [len(t) for t in kept] == [8, 8, 8]
    assert torch.equal(kept[0], to_uint8(torch.cat([stored[4:6], stored[:6]])))
    assert torch.equal(kept[2], torch.cat([labels[4:6], labels[:6]]))
    expect = fit_inverse(kept[0], kept[1], kept[2], CLASSES, steps=40, seed=4)
    with torch.no_grad():
        mse = float(
            torch.nn.functional.mse_loss(expect(from_uint8(kept[0]), kept[2]), from_uint8(kept[1]))
        )
    assert pirate.refit_psnr == pytest.approx(-10 * math.log10(mse), rel=1e-5)
    assert mse < float(torch.nn.functional.mse_loss(stored, images))  # it learnt the change
    # A fit afresh by itself leaves the grid's weights as they are, its optimiser's moments
    # filled at rate 0 and its rate restored.
    pirate.refit()
    again_fit = fit_inverse(kept[0], kept[1], kept[2], CLASSES, steps=40, seed=5)
    for a, b in zip(pirate.net.parameters(), again_fit.parameters(), strict=True):
        assert torch.equal(a, b)
    state = pirate.opt.state_dict()
    assert state["state"][0]["step"] == WARM_STEPS and state["param_groups"][0]["lr"] == 1e-2
    assert pirate.refits == 2
    pirate.refits, pirate.last_refit = 1, 2  # as before the call, for the counts below
    pirate.update(stored[6:], images[6:], labels[6:])  # 1 update since: not due
    assert pirate.refits == 1
    pirate.update(stored[6:], images[6:], labels[6:])
    assert pirate.refits == 2 and pirate.last_refit == 4
    state = pirate.state_dict()
    again = InverseAdversary(3, CLASSES, (16, 16), lr=1e-2, seed=3, refit_every=2)
    again.load_state_dict(state)
    assert (again.updates, again.refits, again.last_refit) == (4, 2, 4)
    with pytest.raises(ValueError, match="refit_every"):
        InverseAdversary(3, CLASSES, (16, 16), refit_every=-1)
    # The protector hands the settings on and logs the fit's PSNR on its pairs.
    model = module(
        surrogate, l_invadv=0.5, invadv_refit_every=1, invadv_refit_steps=5, invadv_refit_pairs=4
    )
    _, logged = bare_step(model, images, labels, model.curriculum.identity)
    assert model._inverse_adv.refits == 1 and model._inverse_adv.refit_steps == 5
    assert float(logged["train/invadv_refit_psnr"]) == pytest.approx(model._inverse_adv.refit_psnr)
    with pytest.raises(ValueError, match="invadv_refit_every"):
        module(surrogate, l_invadv=0.5, invadv_refit_every=-2)
