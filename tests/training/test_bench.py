"""medvision bench: every model measured in its own process, same threads / batches / inputs, ratios to the teacher."""

import json

from medvision.cli import main


def test_bench_table_teacher_student_torch_and_onnx(tiny_run, artifact, tmp_path, capsys):
    out = tmp_path / "bench"
    code = main(["bench", "--teacher", str(tiny_run), "--student", "mv_vit_test", "--onnx", str(artifact),
                 "--batch-sizes", "1,4", "--seconds", "0.05", "--threads", "1", "--out", str(out), "--no-progress"])
    assert code == 0
    report = json.loads((out / "bench.json").read_text())
    assert report["threads"] == 1 and report["batch_sizes"] == [1, 4]
    assert report["matmul"]["fp32_gflops"] > 0
    rows = report["subjects"]
    assert [r["kind"] for r in rows] == ["torch", "torch", "ort"]
    for r in rows:
        assert "error" not in r, r
        assert set(r["results"]) == {"1", "4"}
        for m in r["results"].values():
            assert m["images_per_s"] > 0 and m["runs"] >= 3 and m["p50_ms"] <= m["p99_ms"]
        assert r["peak_rss_mb"] >= r["baseline_rss_mb"] > 0
    assert all(m["vs_teacher"] == 1.0 for m in rows[0]["results"].values())
    # the ONNX Runtime worker holds no torch: its memory is what a serving process needs
    assert rows[2]["torch_imported"] is False and rows[2]["peak_rss_mb"] < rows[0]["peak_rss_mb"]
    table = capsys.readouterr().out
    assert "× teacher b4" in table and "vs teacher" in table and "GFLOP/s" in table
    assert (out / "bench.md").read_text().strip() == table.strip() and (out / "bench.png").stat().st_size > 0


def test_bench_exports_a_named_student_and_refuses_bad_arguments(tmp_path, capsys):
    assert main(["bench", "--teacher", "mv_vit_test", "--student", "mv_vit_test", "--batch-sizes", "2",
                 "--seconds", "0.02", "--threads", "1", "--no-progress", "--rounds", "3", "--out", str(tmp_path / "b")]) == 0
    out = capsys.readouterr().out
    assert "(ORT fp32)" in out and "(ORT dynamic_s8)" in out and "median of 3 interleaved rounds" in out
    report = json.loads((tmp_path / "b" / "bench.json").read_text())
    for row in report["subjects"]:  # every model measured three times; the cell is the median round
        m = row["results"]["2"]
        assert len(m["rounds"]) == 3 and m["images_per_s"] == sorted(m["rounds"])[1]
    assert main(["bench", "--student", "mv_vit_test"]) == 2
    assert main(["bench", "--teacher", "mv_vit_test", "--student", "mv_vit_test", "--batch-sizes", "a"]) == 2
    assert main(["bench", "--teacher", "mv_vit_test", "--onnx", str(tmp_path / "missing.onnx")]) == 2


def test_bench_compares_several_students_and_quantizes_a_cnn_statically(tmp_path, capsys):
    out = tmp_path / "b"
    assert main(["bench", "--teacher", "mv_vit_test", "--student", "mv_vit_test@32", "--student", "mv_cnn_test",
                 "--batch-sizes", "2", "--seconds", "0.02", "--threads", "1", "--no-progress", "--out", str(out)]) == 0
    rows = json.loads((out / "bench.json").read_text())["subjects"]
    assert [(r["role"], r["kind"]) for r in rows] == [("teacher", "torch")] + [("student", "torch"), ("student", "ort"),
                                                                               ("student", "ort")] * 2
    labels = [r["label"] for r in rows]
    # a ViT is quantized dynamically (its MatMuls); a CNN statically, or its convolutions would stay in float
    assert "mv_vit_test@32 (ORT dynamic_s8)" in labels[3] and "mv_cnn_test (ORT static_qdq)" in labels[6]
    # NAME@SIZE: the registered ViT at another input size (a quarter of the patch tokens here)
    assert [r["image_size"] for r in rows] == [64, 32, 32, 32, 64, 64, 64]
    assert all("error" not in r for r in rows)
    assert rows[6]["size_mb"] < rows[5]["size_mb"] / 2  # the convolutions' weights really are INT8
    table = capsys.readouterr().out
    assert table.count("vs teacher mv_vit_test (torch") == 6
    # --onnx / --int8 name one student's files: ambiguous with two students
    assert main(["bench", "--teacher", "mv_vit_test", "--student", "mv_vit_test", "--student", "mv_cnn_test",
                 "--onnx", str(tmp_path / "x.onnx")]) == 2
    assert main(["bench", "--teacher", "mv_vit_test", "--student", "mv_vit_test@big"]) == 2
    assert "input size after '@'" in capsys.readouterr().err
