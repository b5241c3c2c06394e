"""The image store: every image file raeg_pl writes or reads goes through these modules.

* :mod:`~raeg_pl.io.reader`: the one suffix list, folder listings, decoding to 8 bits;
* :mod:`~raeg_pl.io.writer`: PNG encoding, atomic writes, the resume journal;
* :mod:`~raeg_pl.io.manifest`: the one manifest schema (format 2; older ones still read);
* :mod:`~raeg_pl.io.verify`: the one verifier;
* :mod:`~raeg_pl.io.apply`: :func:`~raeg_pl.io.apply.apply_protector` on uint8 images;
* :mod:`~raeg_pl.io.sidecar`: the lossless residual codec;
* :mod:`~raeg_pl.io.protected`: pipeline exports (sharded over DDP ranks);
* :mod:`~raeg_pl.io.owner`, :mod:`~raeg_pl.io.protect`, :mod:`~raeg_pl.io.restore`,
  :mod:`~raeg_pl.io.labels`, :mod:`~raeg_pl.io.commands`: the owner commands
  (``raeg protect | restore | verify``), :mod:`~raeg_pl.io.keyfile`: their key files.

Nothing is imported here, so the owner commands load without Lightning.
"""
