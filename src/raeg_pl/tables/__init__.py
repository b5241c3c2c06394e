"""Paper tables and plots built from the runs' ``results.json`` files alone.

``raeg table --runs DIR [DIR ...] --out OUT`` reads one or more grid run directories::

    DIR/grid.json                                              the grid's plan
    DIR/methods/<row>/results.json                             one protection method
    DIR/pirates/<row>/<arch>/<defense>/seed<k>/results.json    one pirate training run

and writes, for each table, ``OUT/<name>.md``, ``OUT/<name>.tex`` (booktabs) and
``OUT/<name>.csv``, the plots ``OUT/psnr_vs_pirate.png`` and ``OUT/robustness.png``, and an
index ``OUT/README.md``. Tables:

- ``main``:       pirate clean-test accuracy per training-data row and architecture, final
                  mean +- std over seeds (peak mean), no defence plus grayscale and JPEG-10
                  groups when such runs exist, and an authorised row per reversible method;
- ``fidelity``:   distortion of the protected images and quality of their recovery;
- ``robustness``: pirate accuracy per pirate defence for one architecture, and each row's
                  worst case (its highest mean accuracy over the defences, which defence);
- ``inference``:  surrogate and held-out classifiers on protected test images per defence;
- ``summary``:    the two plots.

The main and robustness tables are followed by one comparison per class-wise control row
(method kind ``classwise_noise``): every other method against it in each column, a win or a
loss only when the two cells' ranges over seeds do not overlap (a tie otherwise; undecided
with one seed); ``OUT/<table>_vs_<control>.csv`` holds each. Rows show their grid ``label``
when they have one.

Results must come from one git commit of a clean work tree: results of several commits, of
a dirty tree or with no commit recorded are refused (the error names their run folders)
unless ``--allow-mixed`` is given, which marks their cells (``[c1]``) and names the commits
in the footnotes; the index states the commit.

Any file may be missing (a grid still running, a failed run): its cells show as "—" and are
counted in each table's footnote; a worst case over a row with missing cells is a lower
bound (``≥``). Several run directories are merged; row, architecture and
defence order come from the ``grid.json`` files (first seen), else from the results. The
aggregation is plain Python; matplotlib is imported only to draw the plots.

Modules, each importing only those above it:

- :mod:`~raeg_pl.tables.records`:   reading and validating one ``grid.json`` / ``results.json``;
- :mod:`~raeg_pl.tables.results`:   merging the run directories' plans and results;
- :mod:`~raeg_pl.tables.archive`:   the result records kept beside a committed table;
- :mod:`~raeg_pl.tables.model`:     cells, columns, rows and tables (planned vs missing);
- :mod:`~raeg_pl.tables.renderers`: markdown, LaTeX and CSV;
- :mod:`~raeg_pl.tables.builders`:  the main, fidelity, robustness and inference tables;
- :mod:`~raeg_pl.tables.plots`:     the summary plots;
- :mod:`~raeg_pl.tables.provenance`: the commit check and the cell markers;
- :mod:`~raeg_pl.tables.cli`:       ``raeg table`` (:func:`build_all`, :func:`main`).
"""

from raeg_pl.tables.builders import (
    BUILDERS,
    CONTROL_KIND,
    build_fidelity,
    build_inference,
    build_main,
    build_robustness,
    control_comparisons,
    pirate_stat,
    worst_case,
)
from raeg_pl.tables.cli import PLOTS, TABLES, build_all, main, write_index
from raeg_pl.tables.model import (
    MISSING_TEXT,
    NA,
    NA_TEXT,
    Cell,
    Column,
    Row,
    Stat,
    Table,
    Value,
    Worst,
    format_cell,
    mean_std,
    pct,
    verdict,
)
from raeg_pl.tables.plots import plot_psnr_vs_pirate, plot_robustness
from raeg_pl.tables.provenance import ProvenanceError, check_provenance
from raeg_pl.tables.records import (
    CLEAN,
    NO_DEFENSE,
    SOURCES,
    UNKNOWN_COMMIT,
    CellKey,
    GridPlan,
    PirateRun,
    TableError,
)
from raeg_pl.tables.renderers import latex_escape, to_csv, to_latex, to_markdown
from raeg_pl.tables.results import Results, load_results

__all__ = [
    "BUILDERS",
    "CLEAN",
    "CONTROL_KIND",
    "MISSING_TEXT",
    "NA",
    "NA_TEXT",
    "NO_DEFENSE",
    "PLOTS",
    "ProvenanceError",
    "SOURCES",
    "TABLES",
    "Cell",
    "CellKey",
    "Column",
    "GridPlan",
    "PirateRun",
    "Results",
    "Row",
    "Stat",
    "Table",
    "TableError",
    "UNKNOWN_COMMIT",
    "Value",
    "Worst",
    "build_all",
    "build_fidelity",
    "build_inference",
    "build_main",
    "build_robustness",
    "check_provenance",
    "control_comparisons",
    "format_cell",
    "latex_escape",
    "load_results",
    "main",
    "mean_std",
    "pct",
    "pirate_stat",
    "plot_psnr_vs_pirate",
    "plot_robustness",
    "to_csv",
    "to_latex",
    "to_markdown",
    "verdict",
    "worst_case",
    "write_index",
]
