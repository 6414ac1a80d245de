"""How verification is fed and recorded: --inputs, --iterations, --providers, --save-inputs,
--save-outputs and --report-md.

resnet_tiny.onnx has one input "input" [N, 3, 32, 32] and one output "logits" [N, 10]; verification
defaults N to 2.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import Result
from helpers import invoke

from benchmarks.graph_builder import GraphBuilder

ROOT = Path(__file__).resolve().parents[1]
SAMPLES_DIR = ROOT / "sample_models"
INPUT_SHAPE = (2, 3, 32, 32)


# --- helpers -------------------------------------------------------------------------------------


def copy_sample(tmp_path: Path, name: str = "resnet_tiny.onnx") -> Path:
    target = tmp_path / name
    shutil.copyfile(SAMPLES_DIR / name, target)
    return target


def files_in(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def assert_one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {lines!r}"
    assert lines[0].startswith("bnfold: error:"), lines[0]
    assert "Traceback" not in stderr
    return lines[0]


def uniform(shape, seed: int = 0, dtype=np.float32) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1.0, 1.0, size=shape).astype(dtype)


def fold_json(args: list) -> tuple[Result, dict]:
    result = invoke([*args, "--json"])
    return result, (json.loads(result.stdout) if result.stdout.strip() else {})


def session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def two_input_model(path: Path) -> Path:
    """x + y -> Conv -> BN, both inputs [2, 3, 8, 8]."""
    g = GraphBuilder(np.random.default_rng(2))
    x = g.input("x", [2, 3, 8, 8])
    y = g.input("y", [2, 3, 8, 8])
    out = g.bn(g.conv(g.node("Add", [x, y]), 3, 4, pads=[1, 1, 1, 1]), 4)
    onnx.save(g.model([out]), str(path))
    return path


# --- --inputs ------------------------------------------------------------------------------------


def test_inputs_one_sample(tmp_path):
    model = copy_sample(tmp_path)
    data = tmp_path / "data.npz"
    np.savez(data, input=uniform(INPUT_SHAPE))
    result, report = fold_json([model, "--inputs", data, "-o", tmp_path / "out.onnx"])
    assert result.exit_code == 0, (result.stdout, result.stderr)
    verification = report["verification"]
    assert verification["passed"] is True
    assert verification["seeds"] == []
    assert verification["input_shapes"] == {"input": list(INPUT_SHAPE)}
    (output,) = verification["outputs"]
    assert output["name"] == "logits" and output["elements"] == 2 * 10
    assert (tmp_path / "out.onnx").is_file()


def test_inputs_several_samples(tmp_path):
    model = copy_sample(tmp_path)
    data = tmp_path / "data.npz"
    np.savez(data, input=uniform((3, *INPUT_SHAPE)))  # rank 5: 3 samples of [2, 3, 32, 32]
    result, report = fold_json([model, "--inputs", data, "-o", tmp_path / "out.onnx"])
    assert result.exit_code == 0, (result.stdout, result.stderr)
    verification = report["verification"]
    assert verification["passed"] is True
    assert verification["seeds"] == []
    assert verification["input_shapes"] == {"input": list(INPUT_SHAPE)}  # one sample's shape
    (output,) = verification["outputs"]
    assert output["elements"] == 3 * 2 * 10


def test_inputs_other_batch_size(tmp_path):
    """The batch dim of resnet_tiny is symbolic: user data may use any batch size."""
    model = copy_sample(tmp_path)
    data = tmp_path / "data.npz"
    np.savez(data, input=uniform((5, 3, 32, 32)))
    result, report = fold_json([model, "--inputs", data, "-o", tmp_path / "out.onnx"])
    assert result.exit_code == 0, result.stderr
    assert report["verification"]["input_shapes"] == {"input": [5, 3, 32, 32]}
    assert report["verification"]["outputs"][0]["elements"] == 5 * 10


def test_inputs_in_check_verify(tmp_path):
    model = copy_sample(tmp_path, "no_bn.onnx")
    data = tmp_path / "data.npz"
    np.savez(data, input=uniform((2, 3, 16, 16)))
    result, report = fold_json(["check", "--verify", model, "--inputs", data])
    assert result.exit_code == 0, result.stderr
    assert report["verification"]["passed"] is True and report["verification"]["seeds"] == []


def test_inputs_two_input_model(tmp_path):
    model = two_input_model(tmp_path / "two.onnx")
    data = tmp_path / "data.npz"
    np.savez(data, x=uniform((2, 3, 8, 8), 1), y=uniform((2, 3, 8, 8), 2))
    result, report = fold_json([model, "--inputs", data, "-o", tmp_path / "out.onnx"])
    assert result.exit_code == 0, result.stderr
    assert report["verification"]["input_shapes"] == {"x": [2, 3, 8, 8], "y": [2, 3, 8, 8]}


def test_inputs_missing_an_input(tmp_path):
    model = two_input_model(tmp_path / "two.onnx")
    data = tmp_path / "data.npz"
    np.savez(data, x=uniform((2, 3, 8, 8)))
    before = files_in(tmp_path)
    result = invoke([model, "--inputs", data])
    assert result.exit_code == 2, (result.stdout, result.stderr)
    line = assert_one_error_line(result.stderr)
    assert "'y'" in line and "--inputs" in line
    assert files_in(tmp_path) == before


def test_inputs_empty_npz_is_missing_the_input(tmp_path):
    model = copy_sample(tmp_path)
    data = tmp_path / "empty.npz"
    np.savez(data)
    result = invoke([model, "--inputs", data])
    assert result.exit_code == 2
    assert "'input'" in assert_one_error_line(result.stderr)


@pytest.mark.parametrize("extra", [{}, {"input": uniform(INPUT_SHAPE)}])
def test_inputs_unknown_input(tmp_path, extra):
    model = copy_sample(tmp_path)
    data = tmp_path / "data.npz"
    np.savez(data, images=uniform(INPUT_SHAPE), **extra)
    before = files_in(tmp_path)
    result = invoke([model, "--inputs", data])
    assert result.exit_code == 2, (result.stdout, result.stderr)
    assert "images" in assert_one_error_line(result.stderr)
    assert files_in(tmp_path) == before


@pytest.mark.parametrize("content", ["garbage", "truncated", "corrupt_compressed", "pickled", "missing",
                                     "directory"])
def test_inputs_unreadable(tmp_path, content):
    model = copy_sample(tmp_path)
    data = tmp_path / "data.npz"
    if content == "garbage":
        data.write_bytes(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8).tobytes())
    elif content == "truncated":
        np.savez(data, input=uniform(INPUT_SHAPE))
        data.write_bytes(data.read_bytes()[:300])
    elif content == "corrupt_compressed":
        np.savez_compressed(data, input=np.zeros(INPUT_SHAPE, np.float32))
        damaged = bytearray(data.read_bytes())
        damaged[60:80] = b"x" * 20  # inside the deflate stream of input.npy
        data.write_bytes(bytes(damaged))
    elif content == "pickled":
        np.savez(data, input=np.array([{"a": 1}], dtype=object))
    elif content == "directory":
        data.mkdir()
    before = files_in(tmp_path)
    result = invoke([model, "--inputs", data])
    assert result.exit_code == 2, (result.stdout, result.stderr)
    line = assert_one_error_line(result.stderr)
    assert "--inputs" in line and "data.npz" in line
    assert files_in(tmp_path) == before


@pytest.mark.parametrize("shape", [(2, 4, 32, 32), (3, 32, 32)], ids=["wrong_channels", "wrong_rank"])
def test_inputs_onnxruntime_rejects_is_bad_input(tmp_path, shape):
    """Arrays that onnxruntime rejects for the *original* model are the user's input error (exit 2,
    one line), as for --input-shape (test_cli.test_input_shape_of_wrong_rank_is_bad_input), not a
    failed verification of the fold (exit 1)."""
    model = copy_sample(tmp_path)
    data = tmp_path / "data.npz"
    np.savez(data, input=uniform(shape))
    before = files_in(tmp_path)
    result = invoke([model, "--inputs", data])
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr)
    assert_one_error_line(result.stderr)
    assert files_in(tmp_path) == before


def test_inputs_with_different_sample_counts_is_bad_input(tmp_path):
    """x has 3 samples, y has 2: silently verifying on 2 would drop user data."""
    model = two_input_model(tmp_path / "two.onnx")
    data = tmp_path / "data.npz"
    np.savez(data, x=uniform((3, 2, 3, 8, 8), 1), y=uniform((2, 2, 3, 8, 8), 2))
    result = invoke([model, "--inputs", data])
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr)
    assert_one_error_line(result.stderr)


# --- --iterations ----------------------------------------------------------------------------------


def test_iterations_records_seeds_and_triples_elements(tmp_path):
    model = copy_sample(tmp_path)
    one, single = fold_json([model, "--seed", "5", "-o", tmp_path / "a.onnx"])
    three, triple = fold_json([model, "--seed", "5", "--iterations", "3", "-o", tmp_path / "b.onnx"])
    assert one.exit_code == three.exit_code == 0, (one.stderr, three.stderr)
    assert single["verification"]["seeds"] == [5]
    assert triple["verification"]["seeds"] == [5, 6, 7]
    assert triple["verification"]["seed"] == 5
    (first,), (second,) = single["verification"]["outputs"], triple["verification"]["outputs"]
    assert second["elements"] == 3 * first["elements"] == 3 * 2 * 10
    assert second["passed"] is True
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


def test_iterations_default_seed(tmp_path):
    model = copy_sample(tmp_path, "mlp_bn1d.onnx")
    result, report = fold_json([model, "--iterations", "3", "-o", tmp_path / "out.onnx"])
    assert result.exit_code == 0, result.stderr
    assert report["verification"]["seeds"] == [0, 1, 2]


@pytest.mark.parametrize("value", ["0", "-1", "x"])
def test_iterations_must_be_positive(tmp_path, value):
    model = copy_sample(tmp_path)
    before = files_in(tmp_path)
    result = invoke([model, "--iterations", value])
    assert result.exit_code == 2
    assert "Traceback" not in result.stderr and "--iterations" in result.stderr
    assert files_in(tmp_path) == before


# --- --providers ---------------------------------------------------------------------------------


def test_unknown_provider_exits_2(tmp_path):
    model = copy_sample(tmp_path)
    before = files_in(tmp_path)
    result = invoke([model, "--providers", "NoSuchExecutionProvider"])
    assert result.exit_code == 2, (result.stdout, result.stderr)
    assert "NoSuchExecutionProvider" in assert_one_error_line(result.stderr)
    assert files_in(tmp_path) == before


def test_unknown_provider_in_check_verify_exits_2(tmp_path):
    model = copy_sample(tmp_path)
    result = invoke(["check", "--verify", model, "--providers", "CPUExecutionProvider,NoSuchExecutionProvider"])
    assert result.exit_code == 2, (result.stdout, result.stderr)
    assert "NoSuchExecutionProvider" in assert_one_error_line(result.stderr)


def test_cpu_provider_adds_outputs(tmp_path):
    model = copy_sample(tmp_path)
    result, report = fold_json([model, "--providers", "CPUExecutionProvider", "-o", tmp_path / "out.onnx"])
    assert result.exit_code == 0, (result.stdout, result.stderr)
    names = [o["name"] for o in report["verification"]["outputs"]]
    assert "logits" in names
    assert "logits@CPUExecutionProvider" in names, names
    assert all(o["passed"] for o in report["verification"]["outputs"])


def test_empty_provider_list_is_ignored(tmp_path):
    model = copy_sample(tmp_path)
    result, report = fold_json([model, "--providers", " , ", "-o", tmp_path / "out.onnx"])
    assert result.exit_code == 0, result.stderr
    assert [o["name"] for o in report["verification"]["outputs"]] == ["logits"]


# --- --save-inputs / --save-outputs ----------------------------------------------------------------


def test_save_inputs_and_outputs_reproduce(tmp_path):
    model = copy_sample(tmp_path)
    saved_in, saved_out, target = tmp_path / "in.npz", tmp_path / "out.npz", tmp_path / "folded.onnx"
    result = invoke([model, "--seed", "3", "--iterations", "2", "--save-inputs", saved_in, "--save-outputs",
                     saved_out, "-o", target, "-q"])
    assert result.exit_code == 0, (result.stdout, result.stderr)
    assert saved_in.is_file() and saved_out.is_file()
    with np.load(saved_in) as data:
        inputs = {name: data[name] for name in data.files}
    with np.load(saved_out) as data:
        outputs = {name: data[name] for name in data.files}
    assert set(inputs) == {"input"}
    assert inputs["input"].shape == (2, *INPUT_SHAPE) and inputs["input"].dtype == np.float32
    # the random batches are the documented ones: seeds 3 and 4
    for i, seed in enumerate((3, 4)):
        np.testing.assert_array_equal(inputs["input"][i], uniform(INPUT_SHAPE, seed))
    assert set(outputs) == {"reference/logits", "folded/logits"}
    assert outputs["reference/logits"].shape == outputs["folded/logits"].shape == (2, 2, 10)
    reference, folded = session(model), session(target)
    for i in range(2):
        feeds = {"input": inputs["input"][i]}
        np.testing.assert_array_equal(reference.run(None, feeds)[0], outputs["reference/logits"][i])
        np.testing.assert_array_equal(folded.run(None, feeds)[0], outputs["folded/logits"][i])
    np.testing.assert_allclose(outputs["folded/logits"], outputs["reference/logits"], rtol=1e-4, atol=1e-5)


def test_saved_inputs_feed_back_as_inputs(tmp_path):
    """--save-inputs writes samples stacked on axis 0, exactly what --inputs reads."""
    model = copy_sample(tmp_path)
    saved = tmp_path / "in.npz"
    first, report1 = fold_json([model, "--iterations", "3", "--save-inputs", saved, "-o", tmp_path / "a.onnx"])
    again, report2 = fold_json([model, "--inputs", saved, "-o", tmp_path / "b.onnx"])
    assert first.exit_code == again.exit_code == 0, (first.stderr, again.stderr)
    (o1,), (o2,) = report1["verification"]["outputs"], report2["verification"]["outputs"]
    assert o1["elements"] == o2["elements"] == 3 * 2 * 10
    assert o1["max_abs_error"] == o2["max_abs_error"]


def test_save_user_inputs_single_sample(tmp_path):
    model = copy_sample(tmp_path)
    data, saved = tmp_path / "data.npz", tmp_path / "in.npz"
    array = uniform(INPUT_SHAPE, 9)
    np.savez(data, input=array)
    result = invoke([model, "--inputs", data, "--save-inputs", saved, "-o", tmp_path / "out.onnx", "-q"])
    assert result.exit_code == 0, result.stderr
    with np.load(saved) as loaded:
        np.testing.assert_array_equal(loaded["input"], array[None])


@pytest.mark.usefixtures("drop_epsilon")
def test_save_outputs_on_failed_verification(tmp_path):
    """The dump exists to reproduce a failure: it is written even when verification fails."""
    model = copy_sample(tmp_path, "mlp_bn1d.onnx")
    saved_in, saved_out = tmp_path / "in.npz", tmp_path / "out.npz"
    result = invoke([model, "--save-inputs", saved_in, "--save-outputs", saved_out])
    assert result.exit_code == 1, (result.stdout, result.stderr)
    assert not (tmp_path / "mlp_bn1d.folded.onnx").exists()
    with np.load(saved_out) as data:
        assert set(data.files) == {"reference/logits", "folded/logits"}
        assert not np.array_equal(data["reference/logits"], data["folded/logits"])
        with np.load(saved_in) as inputs:
            np.testing.assert_array_equal(session(model).run(None, {"input": inputs["input"][0]})[0],
                                          data["reference/logits"][0])


def test_save_in_check_mode_without_verify_writes_nothing(tmp_path):
    model = copy_sample(tmp_path)
    before = files_in(tmp_path)
    result = invoke(["check", model, "--save-inputs", tmp_path / "in.npz", "--save-outputs", tmp_path / "out.npz"])
    assert result.exit_code == 1
    assert files_in(tmp_path) == before


@pytest.mark.parametrize("flag", ["--save-inputs", "--save-outputs"])
def test_save_to_unwritable_path_exits_2(tmp_path, flag):
    model = copy_sample(tmp_path)
    before = files_in(tmp_path)
    result = invoke([model, flag, tmp_path / "no_such_folder" / "dump.npz"])
    assert result.exit_code == 2, (result.stdout, result.stderr)
    assert_one_error_line(result.stderr)
    assert files_in(tmp_path) == before  # the model is not written either


# --- --report-md ---------------------------------------------------------------------------------


def test_report_md_has_op_and_verification_tables(tmp_path):
    model = copy_sample(tmp_path)
    report = tmp_path / "report.md"
    result = invoke([model, "--report-md", report, "--iterations", "2", "-q"])
    assert result.exit_code == 0, result.stderr
    text = report.read_text()
    assert "| op | before | after |" in text
    assert "| BatchNormalization | 5 | 1 |" in text
    assert "| output | max abs | max rel | rtol | atol | result |" in text
    (row,) = [line for line in text.splitlines() if line.startswith("| logits |")]
    assert row.rstrip().endswith("| ok |")
    assert "**passed**" in text


def test_report_md_without_verification(tmp_path):
    model = copy_sample(tmp_path)
    report = tmp_path / "report.md"
    assert invoke([model, "--report-md", report, "--no-verify", "-q"]).exit_code == 0
    text = report.read_text()
    assert "| op | before | after |" in text
    assert "| output |" not in text


def test_report_md_for_several_models_and_an_error(tmp_path):
    folder = tmp_path / "models"
    folder.mkdir()
    copy_sample(folder, "resnet_tiny.onnx")
    copy_sample(folder, "bn_first.onnx")
    (folder / "broken.onnx").write_bytes(b"\x00\x01\x02 not a model" * 10)
    report = tmp_path / "report.md"
    result = invoke(["check", folder, "--verify", "--report-md", report])
    assert result.exit_code == 2
    text = report.read_text()
    assert text.count("| op | before | after |") == 2
    assert text.count("| output | max abs |") == 2
    assert "broken.onnx" in text


@pytest.mark.parametrize("where", ["missing_folder", "is_a_directory"])
def test_report_md_unwritable_exits_2(tmp_path, where):
    model = copy_sample(tmp_path)
    target = tmp_path / "nope" / "report.md" if where == "missing_folder" else tmp_path
    result = invoke([model, "--report-md", target, "-o", tmp_path / "out.onnx"])
    assert result.exit_code == 2, (result.stdout, result.stderr)
    line = assert_one_error_line(result.stderr)
    assert "--report-md" in line
