"""The comparison table of `make compare`: per variant and mode, accuracy over the seeds."""

import pytest

from stages.commands.compare import summarize, table, variant_name


def _r(system, variant, acc, tokens=2.0):
    return {"system": system, "variant": variant, "n": 200, "accuracy": acc,
            "mean_tokens": tokens}


def test_summary_has_mean_and_sd_over_seeds_and_no_explain_row_for_answer_only():
    results = [{"system": "teacher", "n": 200, "accuracy": 0.4, "mean_tokens": 29.0}]
    for seed, (a, b, c) in enumerate([(0.70, 0.60, 0.80), (0.74, 0.62, 0.90)]):
        results += [_r("predict", variant_name("answer-only", seed), a),
                    _r("predict", variant_name("dss", seed), b),
                    _r("explain", variant_name("dss", seed), c, 24.0)]
    rows = summarize(results, ["answer-only", "dss"], [0, 1])
    assert [(r["variant"], r["mode"]) for r in rows] == [
        ("answer-only", "predict"), ("dss", "predict"), ("dss", "explain")]
    assert rows[0]["accuracy"] == [0.70, 0.74] and rows[0]["mean"] == pytest.approx(0.72)
    assert rows[2]["sd"] == pytest.approx(0.0707107, rel=1e-5)
    assert rows[2]["mean_tokens"] == 24.0
    text = table(rows, results[:1], 200)
    assert "72.0% ±  2.8" in text and "70.0 74.0" in text and "teacher" in text


def test_variant_folders_are_valid_train_names():
    from pipeline.config import load_config

    name = variant_name("dss+kd", 2)
    assert name == "dss-kd-s2"
    assert load_config("configs/demo.yaml", [f"train.name={name}"]).train.name == name


def test_each_variant_keeps_its_own_settings_whatever_the_overrides():
    from stages.commands.compare import VARIANTS, variant_configs

    cfgs = variant_configs("configs/demo.yaml", ["train.kd_lam=0.3", "train.epochs=1"],
                           list(VARIANTS), [0, 4], 0.2)
    t = {k: c.train for k, c in cfgs.items()}
    assert t[("answer-only", 0)].alpha == 1.0 and t[("answer-only", 0)].kd_lam == 0
    assert t[("dss", 4)].kd_lam == 0 and t[("dss", 4)].alpha == 0.5
    assert t[("dss+kd", 4)].kd_lam == 0.2 and t[("dss+kd", 4)].seed == 4
    assert t[("dss+kd", 4)].name == "dss-kd-s4" and all(x.epochs == 1 for x in t.values())
    assert t[("explain-only", 0)].alpha == 0.0 and t[("explain-only", 0)].kd_lam == 0


def test_one_adapter_per_prefix_reports_each_student_in_its_own_mode():
    from stages.commands.compare import summarize

    results = [{"system": m, "variant": variant_name(v, 0), "accuracy": a, "mean_tokens": 1.0}
               for v in ("answer-only", "explain-only") for m, a in (("predict", 0.5),
                                                                      ("explain", 0.25))]
    rows = summarize(results, ["answer-only", "explain-only"], [0])
    assert [(r["variant"], r["mode"]) for r in rows] == [("answer-only", "predict"),
                                                         ("explain-only", "explain")]


def test_mode_agreement_counts_each_rows_two_answers(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.run_folder import RunFolder
    from stages.commands.compare import agreement_table, mode_agreement

    (tmp_path / "eval").mkdir()
    for mode, right in (("predict", [1, 1, 0, 0, 1]), ("explain", [1, 0, 1, 0, 1])):
        for seed in (0, 1):
            pq.write_table(pa.table({"id": [f"r{i}" for i in range(5)],
                                     "correct": [bool(x) for x in right]}),
                           tmp_path / "eval" / f"{mode}-{variant_name('dss', seed)}.parquet")
    rows = mode_agreement(RunFolder(tmp_path), ["dss", "dss+kd"], [0, 1])
    assert rows == [{"variant": "dss", "both": 4, "explain_only": 2, "predict_only": 2,
                     "neither": 2}]  # dss+kd has no shards: left out
    assert "dss" in agreement_table(rows)


def test_table_columns_stay_aligned_for_long_variant_names():
    """`dss+consistency` is longer than the default column: every row's accuracy, seeds and
    tokens still start where the header's columns do."""
    rows = [{"variant": v, "mode": m, "accuracy": [0.69, 0.615, 0.61], "mean": 0.638,
             "sd": 0.045, "mean_tokens": t}
            for v, m, t in [("dss", "predict", 1.4), ("dss+consistency", "explain", 23.9)]]
    lines = table(rows, [{"system": "teacher", "accuracy": 0.39, "mean_tokens": 28.9}],
                  200).splitlines()
    header, body = lines[0], lines[2:-1]
    for line in body:
        assert len(line) == len(header)
        end = header.index(" sd") + 3                  # the accuracy column ends here
        assert line[end - 3:end] in ("4.5", ".0%"), line
        assert line.find("69.0") in (-1, header.index("per seed"))
    assert "69.0 61.5 61.0" in body[-1] and body[-1].startswith("dss+consistency explain")


def test_late_predict_loss_reads_the_last_fifth_of_each_students_log(tmp_path):
    from pipeline.run_folder import RunFolder
    from stages.commands.compare import late_predict_loss

    run = RunFolder(tmp_path / "run")
    for seed, tail in [(0, [0.3, 0.2, 0.1]), (1, [0.5, 0.5, 0.5])]:
        losses = [9.0, 7.0, 5.0, 3.0, 2.0, 1.0, 0.9] + tail  # logged at steps 10, 20, ..., 100
        run.student(variant_name("dss", seed)).write_jsonl(
            "log.jsonl", [{"step": 10 * (i + 1), "loss_predict": x}
                          for i, x in enumerate(losses)] + [{"step": 100, "train_runtime": 1.0}])
    got = late_predict_loss(run, ["dss", "answer-only"], [0, 1])
    assert list(got) == ["dss"]  # answer-only has no logs: left out
    assert got["dss"] == pytest.approx((0.2 + 0.5) / 2)  # steps 80, 90, 100 of each seed
