"""Attacks on classifiers as pure functions of tensors: the one L-inf PGD (:mod:`.pgd`)."""

from raeg_pl.attacks.pgd import l2_radius_for_psnr, pgd_linf

__all__ = ["l2_radius_for_psnr", "pgd_linf"]
