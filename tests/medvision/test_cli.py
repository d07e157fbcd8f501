import re
import subprocess
import sys

import pytest

from medvision.cli import build_parser, main

COMMANDS = ["synth", "data", "deid", "train", "distill", "evaluate", "export", "quantize", "gate", "card", "bench", "serve", "predict", "score", "recalibrate", "keys", "users"]


def test_every_command_is_registered_in_order():
    listed = re.findall(r"^ {4}(\w+) ", build_parser().format_help(), flags=re.MULTILINE)
    assert listed == COMMANDS


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    assert "usage: medvision " + command in capsys.readouterr().out


def test_console_script_runs():
    proc = subprocess.run([sys.executable, "-m", "medvision.cli", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and "medvision" in proc.stdout


def test_domain_errors_exit_2_with_a_message(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "r"), "train.epochs=-1"]) == 2
    assert "train.epochs" in capsys.readouterr().err
    assert main(["predict", str(tmp_path / "missing"), "--model", "x.onnx"]) == 2
    assert "no such file" in capsys.readouterr().err


def test_predict_against_an_unreachable_service_is_a_clear_error(dicom_files, capsys):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert main(["predict", str(dicom_files[0]), "--url", f"http://127.0.0.1:{port}", "--no-progress"]) == 2
    assert "cannot reach the service" in capsys.readouterr().err


def test_predict_command_reports_auroc(artifact, synth_dir, tiny_run, capsys):
    import json

    out = tmp = tiny_run / "scores.csv"
    code = main(["predict", str(synth_dir / "images"), "--model", str(artifact), "--labels",
                 str(synth_dir / "labels.csv"), "--split", str(tiny_run / "split.csv"), "--subset", "test",
                 "--out", str(out), "--no-progress"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["scored"] == summary["files"] > 0 and summary["refused"] == {}
    assert 0.0 <= summary["auroc"] <= 1.0 and "sensitivity" in summary
    assert len(tmp.read_text().splitlines()) == summary["files"] + 1


def test_predict_from_a_manifest_matches_the_labels_csv(artifact, synth_dir, tiny_run, tmp_path, capsys):
    import json

    common = ["--model", str(artifact), "--split", str(tiny_run / "split.csv"), "--subset", "test", "--no-progress"]
    assert main(["predict", str(synth_dir / "images"), "--labels", str(synth_dir / "labels.csv"), *common]) == 0
    by_labels = json.loads(capsys.readouterr().out)
    m = tmp_path / "m.csv"
    assert main(["data", "manifest", "--rsna", str(synth_dir / "labels.csv"), "--images", str(synth_dir / "images"),
                 "--out", str(m)]) == 0
    capsys.readouterr()
    assert main(["predict", "--manifest", str(m), *common]) == 0
    by_manifest = json.loads(capsys.readouterr().out)
    assert by_manifest["labelled"] == by_labels["labelled"] == by_manifest["files"] > 0
    assert by_manifest["auroc"] == pytest.approx(by_labels["auroc"])
    assert main(["predict", str(synth_dir / "images"), "--manifest", str(m), "--model", str(artifact)]) == 2
    assert main(["predict", "--model", str(artifact)]) == 2


def test_a_bad_service_setting_is_one_clear_line(artifact, monkeypatch, capsys):
    monkeypatch.setenv("MEDVISION_PORT", "eighty")
    assert main(["serve", "--model", str(artifact)]) == 2
    err = capsys.readouterr().err
    assert "MEDVISION_PORT" in err and "Traceback" not in err


def test_overrides_may_stand_after_options_and_strays_are_still_refused(capsys):
    from medvision.cli import parse

    args = parse(["train", "--config", "tiny", "train.epochs=2", "--out", "runs/x", "data.val_fraction=0.25",
                  "model.name=vit_tiny_patch16_224"])
    assert args.out == "runs/x"
    assert args.overrides == ["train.epochs=2", "data.val_fraction=0.25", "model.name=vit_tiny_patch16_224"]
    with pytest.raises(SystemExit):
        parse(["train", "--config", "tiny", "train.epochs=2", "--out", "runs/x", "not-an-override"])
    assert "unrecognized arguments: not-an-override" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse(["synth", "out", "train.epochs=2"])  # a command without overrides takes none
