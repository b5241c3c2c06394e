"""Tests of raeg_pl.tables: aggregation, missing cells, the three formats, plots and the CLI.

The inputs are small synthetic grid run directories written to ``tmp_path`` in the on-disk
layout of ``raeg grid`` (``grid.json``, ``methods/<row>/results.json``,
``pirates/<row>/<arch>/<defence>/seed<k>/results.json``): these are tests of the table
builder, which reads nothing but those files.
"""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

import pytest

from raeg_pl import tables
from raeg_pl.cli import main as raeg_main
from raeg_pl.tables import (
    NA,
    Stat,
    TableError,
    build_fidelity,
    build_inference,
    build_main,
    build_robustness,
    load_results,
    mean_std,
    plot_psnr_vs_pirate,
    plot_robustness,
    to_csv,
    to_latex,
    to_markdown,
)

ARCHS = ["resnet", "vgg"]
COMMIT = "0123456789abcdef"
DEFENSES = ["none", "gray", "jpeg:q=10"]


def slug(defense: str) -> str:
    return defense.replace(":", "_").replace("=", "")


def write_json(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def write_grid(root: Path, rows, archs=ARCHS, defenses=DEFENSES, seeds=(0, 1), **extra) -> Path:
    write_json(
        root / "grid.json",
        {
            "table": extra.pop("table", "main"),
            "profile": extra.pop("profile", "quick"),
            "rows": ["clean", *rows],
            "methods": {r: {"kind": r} for r in rows},
            "archs": list(archs),
            "defenses": list(defenses),
            "seeds": list(seeds),
            "eval_defenses": extra.pop("eval_defenses", ["none", "jpeg:q=75"]),
            **extra,
        },
    )
    return root


def write_pirate(root, row, arch, defense, seed, acc, peak=None, source=None) -> Path:
    source = source or ("clean" if row == "clean" else "protected")
    leaf = "authorized" if source == "recovered" else slug(defense)
    grid = {"kind": "pirate", "table": "main", "row": row, "method": row, "arch": arch}
    grid |= {"defense": defense, "seed": seed, "source": source}
    return write_json(
        root / "pirates" / row / arch / leaf / f"seed{seed}" / "results.json",
        {
            "grid": grid,
            "test_acc": acc,
            "test_acc_peak": acc if peak is None else peak,
            "test_acc_curve": [acc],
            "git": {"commit": COMMIT, "dirty": False},
        },
    )


def write_method(root, row, reversible, psnr=33.0, by_defense=None, heldout=None) -> Path:
    return write_json(
        root / "methods" / row / "results.json",
        {
            "grid": {"kind": "method", "table": "main", "row": row, "method": row},
            "reversible": reversible,
            "psnr_protected": psnr,
            "ssim_protected": 0.95,
            "linf_protected": 8.0,
            "l2_protected": 1.5,
            "psnr_recovered": 48.0 if reversible else None,
            "ssim_recovered": 0.999 if reversible else None,
            "exact_pixel_rate_recovered": 0.97 if reversible else None,
            "surrogate_acc_clean": 0.8,
            "surrogate_acc_protected_by_defense": {"none": 0.1, "jpeg:q=75": 0.5}
            if by_defense is None
            else by_defense,
            "heldout_acc_clean": {"vgg": 0.7} if heldout is None else heldout,
            "heldout_acc_protected_by_defense": {"vgg": {"none": 0.4, "jpeg:q=75": 0.6}}
            if heldout is None
            else {a: {"none": 0.3} for a in heldout},
            "exported_images": 100,
            "test_images": 50,
            "git": {"commit": COMMIT, "dirty": False},
        },
    )


@pytest.fixture()
def grid_dir(tmp_path) -> Path:
    """A main-table grid, partly run: 2 rows x 2 archs x 3 defences x 2 seeds planned."""
    root = write_grid(tmp_path / "main_grid", ["raeg_v1", "pgd"])
    for arch in ARCHS:
        for seed, acc in ((0, 0.70), (1, 0.74)):
            write_pirate(root, "clean", arch, "none", seed, acc, acc + 0.02)
    write_pirate(root, "clean", "resnet", "gray", 0, 0.66)
    write_pirate(root, "clean", "resnet", "jpeg:q=10", 0, 0.60)
    write_pirate(root, "raeg_v1", "resnet", "none", 0, 0.30, 0.35)
    write_pirate(root, "raeg_v1", "resnet", "none", 1, 0.40, 0.45)
    write_pirate(root, "raeg_v1", "vgg", "none", 0, 0.50)
    write_pirate(root, "pgd", "resnet", "none", 0, 0.20)
    write_pirate(root, "pgd", "resnet", "none", 1, 0.22)
    write_pirate(root, "raeg_v1", "resnet", "none", 0, 0.71, source="recovered")
    write_method(root, "raeg_v1", reversible=True, psnr=34.0)
    write_method(root, "pgd", reversible=False, psnr=31.0)
    return root


def row_of(table, label):
    return next(r for r in table.rows if r.labels[0] == label)


def cell_of(table, row, key):
    i = next(i for i, c in enumerate(table.columns) if c.key == key)
    return row_of(table, row).cells[i]


# ---------------------------------------------------------------------------- aggregation
def test_mean_std_uses_sample_std():
    mean, std = mean_std([0.4, 0.5, 0.6])
    assert mean == pytest.approx(0.5)
    assert std == pytest.approx(0.1)  # ddof=1; the population std would be 0.0816
    assert mean_std([0.3]) == (pytest.approx(0.3), None)


def test_main_table_aggregates_seeds_and_marks_single_seed(grid_dir):
    table = build_main(load_results([grid_dir]))
    raeg = cell_of(table, "raeg_v1", "none/resnet")
    assert isinstance(raeg, Stat)
    assert (raeg.n, raeg.n_planned) == (2, 2)
    assert raeg.mean == pytest.approx(0.35) and raeg.std == pytest.approx(0.0707107, abs=1e-6)
    assert raeg.peak == pytest.approx(0.40)
    md = to_markdown(table)
    assert "| raeg_v1 | 35.0 ± 7.1 (40.0) | 50.0 (50.0) (1 seed) |" in md
    # Clean row: clean-source pirates; rows in grid order with clean first.
    assert [r.labels[0] for r in table.rows] == [
        "clean",
        "raeg_v1",
        "pgd",
        "raeg_v1 (authorised)",
    ]
    assert cell_of(table, "clean", "none/vgg").mean == pytest.approx(0.72)
    # The authorised row reads the recovered-source run only.
    auth = row_of(table, "raeg_v1 (authorised)").cells[0]
    assert auth.mean == pytest.approx(0.71) and auth.n == 1


def test_main_table_has_defence_groups_only_when_such_pirates_exist(grid_dir, tmp_path):
    table = build_main(load_results([grid_dir]))
    assert [c.key for c in table.columns] == [
        f"{d}/{a}" for d in ("none", "gray", "jpeg:q=10") for a in ARCHS
    ]
    assert {c.group for c in table.columns} == {"no defence", "gray", "jpeg:q=10"}
    only_none = write_grid(tmp_path / "g2", ["pgd"], defenses=["none", "gray"])
    write_pirate(only_none, "pgd", "resnet", "none", 0, 0.2)
    table = build_main(load_results([only_none]))
    assert [c.key for c in table.columns] == ["none/resnet", "none/vgg"]
    assert all(c.group is None for c in table.columns)


def test_missing_cells_render_as_missing_and_are_counted(grid_dir):
    res = load_results([grid_dir])
    table = build_main(res)
    # Planned: 3 rows x 2 archs x 3 defences, plus the authorised row's 2 no-defence cells
    # (its gray / JPEG cells are not planned: n/a). Present: clean 4, raeg 2, pgd 1, auth 1.
    assert table.n_cells == 3 * 2 * 3 + 2
    assert table.n_missing == table.n_cells - 8
    assert row_of(table, "raeg_v1 (authorised)").cells[2] is NA
    assert cell_of(table, "pgd", "none/vgg") is None
    md = to_markdown(table)
    assert f"{table.n_missing} of {table.n_cells} cells missing" in md
    assert md.count("—") >= table.n_missing
    tex = to_latex(table)
    assert f"{table.n_missing} of {table.n_cells} cells missing" in tex
    rows = list(csv.DictReader(io.StringIO(to_csv(table))))
    pgd = next(r for r in rows if r["training data"] == "pgd")
    assert pgd["none/vgg mean"] == "" and pgd["none/vgg n_seeds"] == ""
    # Robustness of the first arch: 3 rows x 3 defences planned, 6 present.
    rob = build_robustness(res, "resnet")
    assert (rob.n_missing, rob.n_cells) == (3 * 3 - 5, 9)


def test_fewer_seeds_than_planned_are_marked(tmp_path):
    root = write_grid(tmp_path / "g", ["pgd"], archs=["resnet"], defenses=["none"], seeds=[0, 1, 2])
    for seed, acc in ((0, 0.2), (1, 0.3)):
        write_pirate(root, "pgd", "resnet", "none", seed, acc)
    table = build_main(load_results([root]))
    assert "25.0 ± 7.1 (25.0) (2 of 3 seeds)" in to_markdown(table)
    assert table.n_short == 1


# ------------------------------------------------------------------------------- formats
def _split_unescaped(line: str, ch: str) -> list[str]:
    return re.split(rf"(?<!\\){re.escape(ch)}", line)


def test_latex_is_structurally_sound_and_escaped(grid_dir):
    res = load_results([grid_dir])
    for table in (build_main(res), build_fidelity(res), build_inference(res)):
        tex = to_latex(table)
        body = [ln for ln in tex.splitlines() if not ln.startswith("%")]
        text = "\n".join(body)
        for env in ("table", "tabular"):
            assert text.count(f"\\begin{{{env}}}") == text.count(f"\\end{{{env}}}") == 1
        assert text.index("\\toprule") < text.index("\\midrule") < text.index("\\bottomrule")
        assert text.count("{") - text.count("\\{") == text.count("}") - text.count("\\}")
        # Every line inside the tabular has exactly one cell per column.
        spec = re.search(r"\\begin\{tabular\}\{([^}]*)\}", text).group(1).replace(" ", "")
        n_cols = len(spec)
        start = body.index(next(b for b in body if b.startswith("\\begin{tabular}")))
        end = body.index("\\end{tabular}")
        for ln in body[start + 1 : end]:
            if not ln.endswith("\\\\"):
                continue
            cells = _split_unescaped(ln[:-2], "&")
            spans = sum(
                int(m) for c in cells for m in re.findall(r"\\multicolumn\{(\d+)\}", c)
            ) - sum(1 for c in cells if "\\multicolumn" in c)
            assert len(cells) + spans == n_cols, ln
        # No raw special characters: underscores, percent signs and ± are escaped.
        for ln in body:
            assert not re.search(r"(?<!\\)[_%#]", ln), ln
            assert "±" not in ln and "—" not in ln
    tex = to_latex(build_main(res))
    assert "raeg\\_v1" in tex and "(\\%)" in tex and "$\\pm$" in tex
    assert "\\multicolumn{2}{c}{jpeg:q=10}" in tex and "\\cmidrule(lr){6-7}" in tex


def test_csv_round_trips_through_the_csv_module(grid_dir):
    res = load_results([grid_dir])
    for table in (build_main(res), build_fidelity(res), build_robustness(res, "resnet")):
        text = to_csv(table)
        rows = list(csv.reader(io.StringIO(text)))
        header = rows[0]
        assert len(header) == len(set(header))
        assert all(len(r) == len(header) for r in rows[1:])
        assert len(rows) - 1 == len(table.rows)
        # Writing the parsed rows again gives the same text.
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerows(rows)
        assert buf.getvalue() == text
    main_rows = list(csv.DictReader(io.StringIO(to_csv(build_main(res)))))
    raeg = next(r for r in main_rows if r["training data"] == "raeg_v1")
    assert float(raeg["none/resnet mean"]) == pytest.approx(35.0)
    assert float(raeg["none/resnet std"]) == pytest.approx(7.0711, abs=1e-3)
    assert float(raeg["none/resnet peak_mean"]) == pytest.approx(40.0)
    assert raeg["none/resnet n_seeds"] == "2"
    assert raeg["none/vgg std"] == ""  # one seed: no std
    fid = {r["method"]: r for r in csv.DictReader(io.StringIO(to_csv(build_fidelity(res))))}
    assert float(fid["pgd"]["psnr_protected"]) == pytest.approx(31.0)
    assert fid["pgd"]["psnr_recovered"] == "" and fid["pgd"]["reversible"] == "no"
    assert float(fid["raeg_v1"]["exact_pixel_rate_recovered"]) == pytest.approx(97.0)


def test_fidelity_and_inference_tables(grid_dir):
    write_method(grid_dir, "pgd", reversible=False, psnr=31.0, by_defense={}, heldout={})
    raeg = grid_dir / "methods" / "raeg_v1" / "results.json"
    write_json(raeg, {**json.loads(raeg.read_text()), "protector_fit_seconds": 1209.4})
    res = load_results([grid_dir])
    fid = build_fidelity(res)
    # RAEG's protector fit is its own column; a method without a protector: n/a.
    assert cell_of(fid, "raeg_v1", "protector_fit_seconds").text == "1209"
    assert cell_of(fid, "pgd", "protector_fit_seconds") is NA
    assert [r.labels[0] for r in fid.rows] == ["raeg_v1", "pgd"]
    assert cell_of(fid, "pgd", "psnr_recovered") is NA  # not reversible: n/a, not missing
    assert cell_of(fid, "raeg_v1", "psnr_recovered").text == "48.00"
    assert cell_of(fid, "raeg_v1", "reversible").text == "yes"
    assert fid.n_missing == 0
    inf = build_inference(res)
    assert [c.key for c in inf.columns] == ["clean", "none", "jpeg:q=75"]
    assert [r.labels for r in inf.rows] == [
        ["raeg_v1", "surrogate"],
        ["raeg_v1", "held-out vgg"],
        ["pgd", "surrogate"],
        ["pgd", "held-out vgg"],
    ]
    assert [c.text for c in inf.rows[0].cells] == ["80.0", "10.0", "50.0"]
    assert [c.text for c in inf.rows[1].cells] == ["70.0", "40.0", "60.0"]
    # pgd recorded no test-time figures: protected columns n/a; its held-out clean acc missing.
    assert inf.rows[2].cells[1:] == [NA, NA] and inf.rows[3].cells[0] is None
    assert inf.n_missing == 1
    md = to_markdown(inf)
    assert "|  | held-out vgg | 70.0 | 40.0 | 60.0 |" in md  # method named once per group


# --------------------------------------------------------------------------------- merging
def test_several_run_dirs_merge_in_first_seen_order(grid_dir, tmp_path):
    rob = write_grid(
        tmp_path / "rob_grid",
        ["pgd", "ens"],
        archs=["resnet"],
        defenses=["none", "blur:sigma=1.0"],
        seeds=[0],
        table="robustness",
    )
    write_pirate(rob, "ens", "resnet", "blur:sigma=1.0", 0, 0.55)
    # The same run as in the first directory: ignored, so the mean is not skewed.
    write_pirate(rob, "pgd", "resnet", "none", 0, 0.90)
    res = load_results([grid_dir, rob])
    assert res.rows == ["clean", "raeg_v1", "pgd", "ens"]
    assert res.defenses == ["none", "gray", "jpeg:q=10", "blur:sigma=1.0"]
    assert len(res.duplicates) == 1 and "rob_grid" in str(res.duplicates[0])
    table = build_robustness(res, "resnet")
    assert [c.key for c in table.columns] == [*res.defenses, "worst case"]
    assert cell_of(table, "pgd", "none").mean == pytest.approx(0.21)
    assert cell_of(table, "ens", "blur:sigma=1.0").mean == pytest.approx(0.55)
    # ens is planned only by the robustness grid: one arch, two defences.
    assert cell_of(table, "ens", "gray") is NA and cell_of(table, "ens", "none") is None


def test_results_without_grid_json_or_grid_record_use_the_folder_layout(tmp_path):
    root = tmp_path / "bare"
    for row, acc in (("pgd", 0.2), ("clean", 0.7)):
        path = write_pirate(root, row, "resnet", "jpeg:q=10", 3, acc)
        data = json.loads(path.read_text())
        del data["grid"]
        path.write_text(json.dumps(data))
    res = load_results([root])
    assert res.rows == ["clean", "pgd"]  # clean first
    assert res.defenses == ["jpeg_q10"] and res.archs == ["resnet"]
    table = build_main(res)
    # The slug still reads as JPEG-10, so it gets its own column group.
    assert [c.key for c in table.columns] == ["none/resnet", "jpeg_q10/resnet"]
    assert cell_of(table, "pgd", "jpeg_q10/resnet").mean == pytest.approx(0.2)


def test_grid_plan_limits_authorised_archs_and_pirate_rows(tmp_path):
    root = write_grid(
        tmp_path / "g",
        ["raeg", "fid_only"],
        defenses=["none"],
        seeds=[0],
        authorized_archs=["resnet"],
        pirate_rows=["clean", "raeg"],
    )
    write_method(root, "raeg", reversible=True)
    write_method(root, "fid_only", reversible=True)
    table = build_main(load_results([root]))
    assert cell_of(table, "raeg", "none/vgg") is None
    assert cell_of(table, "fid_only", "none/vgg") is NA  # no pirates in this grid
    auth = row_of(table, "raeg (authorised)")
    assert auth.cells[0] is None and auth.cells[1] is NA  # authorised on resnet only


def test_shared_grid_folder_plans_each_tables_own_cells(tmp_path):
    """One folder serving two tables: only each table's own product is planned."""

    def part(table, archs, defenses, seeds):
        return {
            "table": table,
            "rows": ["clean", "raeg"],
            "archs": archs,
            "defenses": defenses,
            "seeds": seeds,
        }

    main = part("main", ["resnet", "vgg"], ["none"], [0, 1])
    robust = part("robustness", ["resnet"], ["none", "gray"], [0])
    root = write_grid(
        tmp_path / "g",
        ["raeg"],
        archs=["resnet", "vgg"],
        defenses=["none", "gray"],
        seeds=[0, 1],
        tables={"main": main, "robustness": robust},
    )
    write_method(root, "raeg", reversible=True)
    write_pirate(root, "raeg", "resnet", "gray", 0, 0.3)
    table = build_main(load_results([root]))
    assert cell_of(table, "raeg", "gray/resnet").n_planned == 1  # robustness: one seed
    assert cell_of(table, "raeg", "gray/vgg") is NA  # no table trains a gray VGG pirate
    assert cell_of(table, "clean", "gray/resnet") is None  # planned, not run
    assert cell_of(table, "raeg", "none/vgg") is None


def test_malformed_grid_tables_entry_names_the_file(tmp_path):
    root = write_grid(tmp_path / "g", ["raeg"], tables={"main": ["not", "a", "plan"]})
    with pytest.raises(TableError, match=r"grid\.json.*'tables'"):
        load_results([root])


# -------------------------------------------------------------------------------- plots/CLI
def test_plots_draw_one_point_per_complete_method(grid_dir, tmp_path):
    res = load_results([grid_dir])
    assert plot_psnr_vs_pirate(res, "resnet", tmp_path / "a.png") == 2
    assert plot_psnr_vs_pirate(res, "vgg", tmp_path / "b.png") == 1  # pgd has no vgg pirate
    # Bars: clean 3 defences, raeg_v1 and pgd no defence only.
    assert plot_robustness(res, "resnet", tmp_path / "c.png") == 5
    for name in ("a.png", "b.png", "c.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_writes_every_expected_file(grid_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "tables"
    assert raeg_main(["table", "--runs", str(grid_dir), "--out", str(out)]) == 0
    expected = {
        f"{t}.{ext}"
        for t in ("main", "fidelity", "robustness", "inference")
        for ext in ("md", "tex", "csv")
    }
    expected |= {"psnr_vs_pirate.png", "robustness.png", "README.md"}
    assert {p.name for p in out.iterdir()} == expected
    index = (out / "README.md").read_text()
    for name in expected - {"README.md"}:
        assert f"({name})" in index
    assert "Profile: quick." in index and str(grid_dir.resolve()) in index
    # Run below the working directory: named relative to it, as a committed index must be.
    monkeypatch.chdir(grid_dir.parent)
    assert raeg_main(["table", "--runs", str(grid_dir), "--out", str(tmp_path / "rel")]) == 0
    index = (tmp_path / "rel" / "README.md").read_text()
    assert f"- `{grid_dir.name}` (" in index and str(grid_dir.resolve()) not in index
    assert "`0123456789ab`" in index  # the runs' git commit
    assert "Pirate accuracy" in (out / "main.md").read_text()

    only = tmp_path / "only"
    assert (
        tables.main(
            ["--runs", str(grid_dir), "--out", str(only), "--tables", "fidelity", "--arch", "vgg"]
        )
        == 0
    )
    assert {p.name for p in only.iterdir()} == {
        "fidelity.md",
        "fidelity.tex",
        "fidelity.csv",
        "README.md",
    }
    assert tables.main(["--runs", str(grid_dir), "--out", str(only), "--arch", "vit"]) == 2
    assert "'vit' not found" in capsys.readouterr().err


def test_empty_run_dir_gives_a_clear_error(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert tables.main(["--runs", str(empty), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert str(empty) in err and "no grid.json and no results" in err
    assert tables.main(["--runs", str(tmp_path / "gone"), "--out", str(tmp_path / "o")]) == 2
    assert "run directory not found" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_only_grid_json_gives_all_missing_tables(tmp_path):
    root = write_grid(tmp_path / "g", ["pgd"], defenses=["none"], seeds=[0])
    res = load_results([root])
    table = build_main(res)
    assert table.n_missing == table.n_cells == 2 * 2
    assert build_fidelity(res).n_missing == len(build_fidelity(res).columns) == 13


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "cannot read JSON"),
        ("[1, 2]", "expected a JSON object"),
        (json.dumps({"grid": {"kind": "pirate", "row": "pgd"}}), "lacks 'arch'"),
        (None, "not a fraction"),  # an accuracy written in percent
    ],
)
def test_malformed_results_name_the_file(grid_dir, tmp_path, capsys, content, message):
    path = write_pirate(grid_dir, "pgd", "vgg", "gray", 0, 0.3)
    if content is None:
        data = json.loads(path.read_text())
        data["test_acc"] = 41.0
        content = json.dumps(data)
    path.write_text(content)
    with pytest.raises(TableError, match=message) as err:
        load_results([grid_dir])
    assert str(path) in str(err.value)
    assert tables.main(["--runs", str(grid_dir), "--out", str(tmp_path / "o")]) == 2
    assert str(path) in capsys.readouterr().err


def test_malformed_method_field_names_the_file(grid_dir):
    path = grid_dir / "methods" / "pgd" / "results.json"
    data = json.loads(path.read_text())
    data["psnr_protected"] = "31 dB"
    path.write_text(json.dumps(data))
    with pytest.raises(TableError, match="psnr_protected") as err:
        load_results([grid_dir])
    assert str(path) in str(err.value)


# ---------------------------------------------------------------- worst case, comparisons
def seeded_grid(root: Path, accs: dict, methods: dict, defenses=("none", "jpeg:q=10")) -> Path:
    """A robustness grid of one arch; ``accs[row][defence]`` = per-seed accuracies."""
    write_grid(
        root,
        list(methods),
        archs=["resnet"],
        defenses=list(defenses),
        seeds=[0, 1, 2],
        table="robustness",
        methods=methods,
    )
    for row, by_def in accs.items():
        for d, values in by_def.items():
            for seed, acc in enumerate(values):
                write_pirate(root, row, "resnet", d, seed, acc)
    for row in methods:
        write_method(root, row, reversible=False)
    return root


def test_verdict_needs_the_seed_ranges_apart():
    def s(*accs):
        mean, std = mean_std(list(accs))
        return Stat(mean, std, len(accs), len(accs), lo=min(accs), hi=max(accs))

    control = s(0.40, 0.45, 0.42)
    assert tables.verdict(s(0.10, 0.12, 0.11), control) == "win"
    assert tables.verdict(s(0.50, 0.55, 0.52), control) == "loss"
    # Means 4 points apart, but the ranges overlap: no win.
    assert tables.verdict(s(0.36, 0.41, 0.38), control) == "tie"
    assert tables.verdict(s(0.10), control) == "undecided (1 seed)"
    assert tables.verdict(control, s(0.9)) == "undecided (1 seed)"


def test_robustness_worst_case_is_the_best_pirate_and_a_lower_bound_when_cells_miss(tmp_path):
    methods = {"raeg": {"kind": "raeg"}, "pgd": {"kind": "pgd"}}
    root = seeded_grid(
        tmp_path / "rob",
        {
            "clean": {"none": [0.70, 0.72, 0.71], "jpeg:q=10": [0.60, 0.62, 0.61]},
            "raeg": {"none": [0.10, 0.12, 0.11], "jpeg:q=10": [0.47, 0.50, 0.48]},
            "pgd": {"none": [0.30, 0.32, 0.31]},  # JPEG-10 still missing
        },
        methods,
    )
    table = build_robustness(load_results([root]), "resnet")
    assert table.columns[-1].label == "worst case"
    worst = cell_of(table, "raeg", "worst case")
    assert worst.defense == "jpeg q10" and not worst.lower_bound
    assert worst.stat.mean == pytest.approx(0.48333, abs=1e-4)
    assert cell_of(table, "clean", "worst case").defense == "none"
    assert cell_of(table, "pgd", "worst case").lower_bound
    # Worst cases are derived: they are not counted as cells of the grid.
    assert (table.n_missing, table.n_cells) == (1, 6)

    md = to_markdown(table)
    assert "| raeg | 11.0 ± 1.0 | 48.3 ± 1.5 | 48.3 ± 1.5 (jpeg q10) |" in md
    assert "| pgd | 31.0 ± 1.0 | — | ≥ 31.0 ± 1.0 (none) |" in md
    assert "≥: a lower bound" in md
    tex = to_latex(table)
    assert "48.3 $\\pm$ 1.5 (jpeg q10)" in tex and "$\\geq$ 31.0 $\\pm$ 1.0 (none)" in tex
    rows = {r["training data"]: r for r in csv.DictReader(io.StringIO(to_csv(table)))}
    assert rows["raeg"]["worst case mean"] == "48.3333"
    assert rows["raeg"]["worst case defence"] == "jpeg q10"
    assert rows["raeg"]["worst case lower_bound"] == "no"
    assert rows["pgd"]["worst case lower_bound"] == "yes"


def test_methods_are_compared_with_the_classwise_control_found_by_its_kind(tmp_path):
    # The control's row name says nothing: only its kind makes it the control.
    methods = {
        "raeg": {"kind": "raeg"},
        "shortcut_ref": {"kind": "classwise_noise"},
        "pgd": {"kind": "pgd"},
        "weak": {"kind": "poison"},
    }
    root = seeded_grid(
        tmp_path / "rob",
        {
            "clean": {"none": [0.70, 0.72, 0.71], "jpeg:q=10": [0.60, 0.62, 0.61]},
            "shortcut_ref": {"none": [0.40, 0.45, 0.42], "jpeg:q=10": [0.60, 0.61, 0.62]},
            "raeg": {"none": [0.10, 0.12, 0.11], "jpeg:q=10": [0.47, 0.50, 0.48]},
            "pgd": {"none": [0.41, 0.50, 0.44], "jpeg:q=10": [0.30]},
            "weak": {"none": [0.60, 0.62, 0.61], "jpeg:q=10": [0.70, 0.71, 0.72]},
        },
        methods,
    )
    res = load_results([root])
    table = build_robustness(res, "resnet")
    (comp,) = table.comparisons
    assert comp.name == "robustness_vs_shortcut_ref"
    assert [r.labels[0] for r in comp.rows] == ["raeg", "pgd", "weak"]
    text = {
        (r.labels[0], c.key): cell.text for r in comp.rows for c, cell in zip(comp.columns, r.cells)
    }
    assert text[("raeg", "none")] == "win, -31.3"
    assert text[("pgd", "none")] == "tie, +2.7"  # higher mean, overlapping ranges
    assert text[("pgd", "jpeg:q=10")] == "undecided (1 seed), -31.0"
    assert text[("weak", "none")] == "loss, +18.7"
    assert text[("raeg", "worst case")].startswith("win")
    md = to_markdown(table)
    assert "## " in md and "against the class-wise control shortcut_ref" in md
    assert "| weak | loss, +18.7 | loss, +10.0 | loss, +10.0 |" in md
    assert to_latex(table).count("\\begin{tabular}") == 2

    main = build_main(res)
    (main_comp,) = main.comparisons
    assert main_comp.name == "main_vs_shortcut_ref" and len(main_comp.rows) == 3

    out = tmp_path / "tables"
    tables.build_all([root], out, ["main", "robustness"])
    rows = list(csv.DictReader(io.StringIO((out / "robustness_vs_shortcut_ref.csv").read_text())))
    assert rows[0]["training data"] == "raeg" and rows[0]["none"] == "win, -31.3"
    index = (out / "README.md").read_text()
    assert "(robustness_vs_shortcut_ref.csv)" in index and "(main_vs_shortcut_ref.csv)" in index
    line = next(ln for ln in index.splitlines() if "(robustness_vs_shortcut_ref.csv)" in ln)
    assert "4 win, 1 tie, 1 undecided (1 seed), 3 loss" in line


def test_without_a_control_row_the_table_says_so(grid_dir):
    table = build_robustness(load_results([grid_dir]), "resnet")
    assert table.comparisons == []
    assert "No class-wise control row (a row of kind classwise_noise)" in to_markdown(table)


# ------------------------------------------------------------------------- named rows
def test_row_labels_are_shown_in_every_table(tmp_path):
    labels = {"raeg_paper": "RAEG (paper, unconditioned)", "raeg_cond": "RAEG-C (extension)"}
    methods = {r: {"kind": "raeg", "label": label} for r, label in labels.items()}
    methods["pgd"] = {"kind": "pgd"}  # no label: the row name
    root = seeded_grid(
        tmp_path / "rob",
        {r: {"none": [0.1, 0.2, 0.15]} for r in methods},
        methods,
    )
    write_method(root, "raeg_cond", reversible=True)
    write_pirate(root, "raeg_cond", "resnet", "none", 0, 0.7, source="recovered")
    res = load_results([root])
    assert res.label("raeg_paper") == "RAEG (paper, unconditioned)" and res.label("pgd") == "pgd"
    for table in (build_main(res), build_robustness(res, "resnet"), build_fidelity(res)):
        shown = [r.labels[0] for r in table.rows]
        assert "RAEG (paper, unconditioned)" in shown and "RAEG-C (extension)" in shown
        assert "pgd" in shown and "raeg_paper" not in shown and "raeg_cond" not in shown
    assert "RAEG-C (extension) (authorised)" in [r.labels[0] for r in build_main(res).rows]
    inference = build_inference(res)
    assert {r.labels[0] for r in inference.rows} == {*labels.values(), "pgd"}
    assert "RAEG (paper, unconditioned)" in to_latex(build_robustness(res, "resnet"))


def test_a_label_that_is_not_text_names_the_grid_file(tmp_path):
    root = write_grid(tmp_path / "g", ["raeg"], methods={"raeg": {"kind": "raeg", "label": 3}})
    with pytest.raises(TableError, match=r"grid\.json: methods\.raeg\.label must be"):
        build_main(load_results([root]))


def test_a_label_reaches_neither_the_method_nor_the_stage_recipe(tmp_path, monkeypatch):
    import raeg_pl.grid as grid_mod
    from raeg_pl.config import row_method_params, validate_grid_config
    from raeg_pl.grid import Grid

    row = {"kind": "pgd", "eps": 4, "label": "PGD (Fowl et al.)"}
    assert row_method_params(row) == {"kind": "pgd", "eps": 4}

    exported: list[dict] = []
    monkeypatch.setattr(
        grid_mod, "export_method", lambda d, params, *a, **k: exported.append(params) or {}
    )

    def method_recipe(spec: dict, run: str) -> str:
        cfg = {"table": "main", "rows": {"pgd": spec}, "pirate": {"max_epochs": 1, "model": {}}}
        grid = Grid(cfg, tmp_path / run)
        grid.method_stage("pgd", spec, [])
        return grid.recipes["methods/pgd"]

    unlabelled = {k: v for k, v in row.items() if k != "label"}
    assert method_recipe(row, "a") == method_recipe(unlabelled, "b")
    assert method_recipe(row, "c") != method_recipe({**unlabelled, "eps": 8}, "d")
    assert exported[0] == {"kind": "pgd", "eps": 4}
    cfg = {"rows": {"pgd": row}, "pirate": {"max_epochs": 1, "model": {}}}
    assert validate_grid_config(cfg) == []
    bad = validate_grid_config({**cfg, "rows": {"pgd": {**row, "label": ""}}})
    assert bad == ["rows.pgd.label: must be a non-empty string, got ''"]
