"""Attacks on classifiers as pure functions of tensors: the one L-inf PGD (:mod:`.pgd`)."""

from raeg_pl.attacks.pgd import pgd_linf

__all__ = ["pgd_linf"]
