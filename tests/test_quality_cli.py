"""`python -m fam.quality`: its JSON rows, its table and the AM verdict rule, on a run
small enough for CI (one image per cell at 1.25×)."""

import json

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("safetensors")

from fam.quality import am_verdict, main, table


def row(method, value, n=64, scale=2, metric="coherent_stripes", world="stripes"):
    se = (value * (1 - value) / n) ** 0.5
    return dict(world=world, scale=scale, method=method, n=n, metric=metric,
                value=value, se=se)


def test_am_verdict_needs_more_than_twice_the_se_of_the_difference():
    # FAM − FM only = 0.20, SE of the difference √(2 · 0.25/64) = 0.088: 0.20 > 0.177
    helps = am_verdict([row("fam", 0.5), row("fm_only", 0.3), row("hires_1.0", 0.1)])
    assert len(helps) == 1 and helps[0].endswith("AM helps") and "+0.20" in helps[0]
    # 0.15 < 2 SE: not measurable, whatever the sign suggests
    assert am_verdict([row("fam", 0.45), row("fm_only", 0.3)])[0].endswith(
        "no measurable AM benefit")
    both = am_verdict([row("am_only", 0.2), row("hires_1.0", 0.0), row("fam", 0.0),
                       row("fm_only", 0.0)])
    assert [v.endswith("AM helps") for v in both] == [False, True]
    assert am_verdict([row("fam", 0.5, metric="one_round_disc")]) == []


def test_am_verdict_of_world_3_is_on_copies_agree():
    rows = [row(m, v, metric=k, world="copies") for m, v in (("fam", 0.6), ("fm_only", 0.2))
            for k in ("copies_agree", "two_patches")]
    rows += [row(m, v, metric="copies_agree_in_place", world="copies")    # a diagnostic, not the rule
             for m, v in (("fam", 0.0), ("fm_only", 0.9))]
    lines = am_verdict(rows)
    assert lines == am_verdict(rows, "copies") and len(lines) == 1
    assert lines[0].startswith("2x copies agree: FAM (defaults) - FAM, FM only = +0.40")
    assert lines[0].endswith("AM helps")
    assert am_verdict(rows, "stripes") == []
    taught = rows + [row(m, v, world="copies", metric="copies_agree")
                     for m, v in (("am_only:blocks=2,3", 0.3), ("hires_1.0", 0.25))]
    lines = am_verdict(taught, "copies")          # AM on the blocks the model was taught in
    assert len(lines) == 2 and lines[1].startswith(
        "2x copies agree: FAM, AM only, AM blocks 2,3 - Hires fix, strength 1.0 = +0.05")
    assert lines[1].endswith("no measurable AM benefit")
    assert am_verdict([dict(r, world="stripes", metric="coherent_stripes")
                       for r in taught[-2:]], "stripes") == []      # world 3's comparison only


def test_unknown_method_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--method", "fam:lambda=7", "--n", "1"])
    assert e.value.code == 2 and "am_lambda" in capsys.readouterr().err


def test_json_rows_table_and_grid(tmp_path, capsys):
    args = ["--world", "stripes", "--scale", "1.25", "--method", "hires_1.0", "fam",
            "native:attention=off", "--n", "1", "--out", str(tmp_path), "--no-progress", "--threads", "1"]
    assert main(args + ["--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    rows = out["rows"]
    assert {(r["scale"], r["method"]) for r in rows} == {(1, "native"), (1.25, "hires_1.0"),
                                                          (1.25, "fam"), (1, "native:attention=off")}
    assert {r["metric"] for r in rows} == {"one_round_disc", "coherent_stripes",
                                           "native_orientation"}
    for r in rows:
        assert set(r) == {"world", "scale", "method", "n", "metric", "value", "se"}
        assert r["n"] == 1 and r["value"] in (0, 1) and r["se"] == 0
    assert len(out["am_verdict"]) == 0                  # no FM only / AM only row to compare
    assert (tmp_path / "stripes.png").stat().st_size > 0
    md = table(rows, "stripes", [1.25])
    assert md.splitlines()[0] == ("| method | 1.25× one round disc | 1.25× coherent stripes "
                                  "| 1.25× native orientation |")
    assert len(md.splitlines()) == 2 + 4
    assert "| native, self-attention off |" in md
