"""The CLI: --help everywhere, one-line errors with exit status 2, nothing written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from latentlab.cli import app
from tests.conftest import REPO, tiny_params, write_idx

runner = CliRunner()


@pytest.mark.parametrize(
    "command", ["ingest", "validate", "corrupt", "train", "evaluate", "report", "flow", "ui", "check-params"]
)
def test_every_command_has_help(command):
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0
    assert "Usage" in result.output


def _project(tmp_path: Path, datasets: dict, mutate=None) -> Path:
    params = tiny_params(tmp_path, datasets)
    if mutate:
        mutate(params)
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    return tmp_path


def _cli(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "latentlab", *args, "--root", str(root)], capture_output=True, text=True, timeout=120
    )


def test_bad_param_is_one_line_exit_2_no_traceback(tmp_path):
    root = _project(
        tmp_path, {"d": {"kind": "idx", "path": str(tmp_path)}}, lambda p: p["ingest"].update(val_fraction=2)
    )
    result = _cli(root, "ingest", "d")
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        == f"error: {root / 'params.yaml'}: ingest.val_fraction: Input should be less than 1 (got 2)"
    )
    assert not (root / "data").exists()


def test_truncated_idx_is_one_line_exit_2_nothing_written(tmp_path):
    folder = tmp_path / "idx"
    images = write_idx(folder / "train-images-idx3-ubyte", __import__("numpy").zeros((10, 4, 4), "uint8"))
    write_idx(folder / "train-labels-idx1-ubyte", __import__("numpy").zeros(10, "uint8"))
    images.write_bytes(images.read_bytes()[:-7])  # cut the last 7 pixels
    root = _project(tmp_path, {"d": {"kind": "idx", "path": str(folder)}})
    result = _cli(root, "ingest", "d")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len([line for line in lines if line.startswith("error:")]) == 1
    assert "train-images-idx3-ubyte" in lines[-1] and "truncated" in lines[-1]
    assert "Traceback" not in result.stderr
    assert not (root / "data" / "processed" / "d").exists()


def test_sat6_without_files_says_where_to_get_it(tmp_path):
    root = _project(tmp_path, {"sat6": {"kind": "sat6", "path": None}})
    result = _cli(root, "ingest", "sat6")
    assert result.returncode == 2
    message = result.stderr.strip().splitlines()[-1]
    assert "kaggle" in message.lower() and "ingest.datasets.sat6.path" in message


def test_check_params_prints_parsed_config():
    result = runner.invoke(app, ["check-params", "--root", str(REPO)])
    assert result.exit_code == 0
    assert '"n_mels": 32' in result.output


def _write_bad_inputs(tmp_path: Path) -> dict[str, tuple[dict, str]]:
    """One broken source per bad-input case: (dataset config, text the error must contain)."""
    import numpy as np
    import soundfile as sf

    cases: dict[str, tuple[dict, str]] = {}
    # A mis-headed IDX file: the magic number is not 0x0000.
    bad = tmp_path / "misheaded"
    write_idx(bad / "train-images-idx3-ubyte", np.zeros((4, 4, 4), "uint8"))
    write_idx(bad / "train-labels-idx1-ubyte", np.zeros(4, "uint8"))
    raw = bytearray((bad / "train-images-idx3-ubyte").read_bytes())
    raw[0] = 0x12
    (bad / "train-images-idx3-ubyte").write_bytes(bytes(raw))
    cases["misheaded_idx"] = ({"kind": "idx", "path": str(bad)}, "train-images-idx3-ubyte")
    # Images and labels of different counts.
    counts = tmp_path / "counts"
    write_idx(counts / "train-images-idx3-ubyte", np.zeros((5, 4, 4), "uint8"))
    write_idx(counts / "train-labels-idx1-ubyte", np.zeros(4, "uint8"))
    cases["count_mismatch"] = ({"kind": "idx", "path": str(counts)}, "train-labels-idx1-ubyte")
    # A CSV row of the wrong width, and a NaN pixel.
    (tmp_path / "wide.csv").write_text("label," + ",".join(f"p{i}" for i in range(4)) + "\n0,1,2,3,4\n1,1,2,3\n")
    cases["csv_width"] = ({"kind": "csv", "path": str(tmp_path / "wide.csv"), "shape": [1, 2, 2]}, "wide.csv")
    (tmp_path / "nan.csv").write_text("label,a,b,c,d\n0,1,2,3,4\n1,1,,3,4\n")
    cases["csv_nan"] = ({"kind": "csv", "path": str(tmp_path / "nan.csv"), "shape": [1, 2, 2]}, "nan.csv")
    # SAT-6 labels that are not one-hot.
    sat = tmp_path / "sat6"
    sat.mkdir()
    row = ",".join(["7"] * 3136)
    for split in ("train", "test"):
        (sat / f"X_{split}_sat6.csv").write_text(f"{row}\n{row}\n")
        (sat / f"y_{split}_sat6.csv").write_text("1,0,0,0,0,0\n1,1,0,0,0,0\n")
    cases["sat6_not_one_hot"] = ({"kind": "sat6", "path": str(sat)}, "one-hot")
    # WAVs: empty, stereo, unreadable.
    for name, make in {
        "empty": lambda p: sf.write(p, np.zeros(0, np.float32), 8000),
        "stereo": lambda p: sf.write(p, np.zeros((800, 2), np.float32), 8000),
        "garbage": lambda p: p.write_bytes(b"RIFF nonsense, not audio"),
    }.items():
        folder = tmp_path / f"wav_{name}"
        folder.mkdir()
        sf.write(folder / "1_ok_0.wav", 0.1 * np.ones(800, np.float32), 8000)
        make(folder / "2_bad_0.wav")
        cases[f"wav_{name}"] = ({"kind": "speech", "path": str(folder)}, "2_bad_0.wav")
    return cases


def test_every_bad_input_is_one_line_exit_2_nothing_written(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cases = _write_bad_inputs(tmp_path / "inputs")
    for name, (source, expected) in cases.items():
        root = _project(tmp_path / name, {name: source})
        result = runner.invoke(app, ["ingest", name, "--root", str(root)])
        assert result.exit_code == 2, (name, result.output)
        errors = [line for line in result.output.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and expected in errors[0], (name, result.output)
        assert "Traceback" not in result.output, name
        assert not (root / "data" / "processed" / name).exists(), name


def test_full_scale_overlay_gives_valid_dvc_arguments():
    result = runner.invoke(app, ["overlay-args", str(REPO / "configs" / "full_scale.yaml"), "--root", str(REPO)])
    assert result.exit_code == 0, result.output
    args = result.output.split()
    assert args[0] == "-S" and len(args) % 2 == 0
    pairs = dict(a.split("=", 1) for a in args[1::2])
    assert pairs["++train.zoo.conv_plus.training.max_train_samples"] == "null"
    assert pairs["++evaluate.max_test_samples"] == "null"
    assert all(" " not in a for a in args)  # safe for `dvc exp run $(latentlab overlay-args ...)`


def test_overlay_arguments_applied_by_dvc_give_the_merged_params(tmp_path):
    # DVC's own `exp run -S` code (Hydra overrides) applied to a copy of params.yaml must
    # give params.yaml merged with the overlay, keys params.yaml lacks included.
    import yaml
    from dvc.utils.hydra import apply_overrides

    from latentlab.overlay import merge, overlay_args

    overlay_path = REPO / "configs" / "full_scale.yaml"
    base = yaml.safe_load((REPO / "params.yaml").read_text())
    overlay = yaml.safe_load(overlay_path.read_text())
    assert "lr_schedule" not in base["train"]["zoo"]["deep"]["training"]  # a key the overlay adds
    assert overlay["train"]["zoo"]["deep"]["training"]["lr_schedule"] == "cosine"
    copy = tmp_path / "params.yaml"
    copy.write_text((REPO / "params.yaml").read_text())
    args = overlay_args(REPO / "params.yaml", overlay_path)
    apply_overrides(copy, args[1::2])
    assert yaml.safe_load(copy.read_text()) == merge(base, overlay)


def test_overlay_with_a_bad_key_is_rejected(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  zoo:\n    deep:\n      training: {epoch: 3}\n")
    result = runner.invoke(app, ["overlay-args", str(bad), "--root", str(REPO)])
    assert result.exit_code == 2
    assert "train.zoo.deep.training.epoch: unknown key" in result.output


def test_set_dotted_assigns_yaml_values_and_names_bad_assignments():
    # The benchmarks' --set KEY=VALUE: dotted keys as in `dvc exp run -S`, values read as YAML.
    from latentlab.errors import ConfigError
    from latentlab.overlay import set_dotted

    params = {"train": {"zoo": {"deep": {"training": {"epochs": 6}}}}}
    set_dotted(params, "train.zoo.deep.training.epochs=40")
    set_dotted(params, "train.zoo.deep.latent_sizes=[4, 6]")
    set_dotted(params, "train.zoo.deep.training.max_train_samples=null")
    set_dotted(params, "evaluate.max_test_samples=500")  # a missing section is created
    assert params == {
        "train": {"zoo": {"deep": {"training": {"epochs": 40, "max_train_samples": None}, "latent_sizes": [4, 6]}}},
        "evaluate": {"max_test_samples": 500},
    }
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        set_dotted(params, "train.zoo.deep.training.epochs")
    with pytest.raises(ConfigError, match="train.zoo.deep.training.epochs is not a section"):
        set_dotted(params, "train.zoo.deep.training.epochs.x=1")
    with pytest.raises(ConfigError, match="not YAML"):
        set_dotted(params, "train.zoo.deep.hidden=[1, 2")
