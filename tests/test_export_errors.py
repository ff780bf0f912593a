"""Bad inputs: each is a clear error naming the file/parameter, and leaves nothing behind."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ggufship.errors import CheckpointError, OutputError, ReleaseSpecError, UsageError
from ggufship.export import ExportRequest, export_checkpoint
from ggufship.integrity import verify_export
from tests.fixtures import checkpoints


def _export(ckpt: Path, out: Path, **kw):
    kw.setdefault("quants", ("F16",))
    kw.setdefault("check_tokenizer", False)
    return export_checkpoint(ExportRequest(checkpoint=ckpt, out_dir=out, name="bad", version="1", **kw))


def _assert_nothing_left(out: Path) -> None:
    assert not out.exists()
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    assert leftovers == []


@pytest.fixture
def ckpt(tmp_path: Path, llama_ckpt: Path) -> Path:
    return checkpoints.copy_tree(llama_ckpt, tmp_path / "ckpt")


def test_missing_config(ckpt: Path, tmp_path: Path) -> None:
    (ckpt / "config.json").unlink()
    out = tmp_path / "o" / "out"
    out.parent.mkdir()
    with pytest.raises(CheckpointError, match=r"config\.json: missing"):
        _export(ckpt, out)
    _assert_nothing_left(out)


def test_truncated_safetensors(ckpt: Path, tmp_path: Path) -> None:
    weights = ckpt / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 1000])
    out = tmp_path / "o" / "out"
    out.parent.mkdir()
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated safetensors file \(1000 bytes"):
        _export(ckpt, out)
    _assert_nothing_left(out)


def test_tensor_shape_mismatch(ckpt: Path, tmp_path: Path) -> None:
    checkpoints.set_config(ckpt, intermediate_size=384)
    out = tmp_path / "o" / "out"
    out.parent.mkdir()
    with pytest.raises(
        CheckpointError,
        match=r"model\.safetensors: tensor model\.layers\.0\.mlp\..* has shape "
        r"\[256, 512\], but config\.json implies \[256, 384\]",
    ):
        _export(ckpt, out)
    _assert_nothing_left(out)


def test_missing_tensor_in_shard_index(tmp_path: Path) -> None:
    ckpt = checkpoints.sharded(tmp_path / "src")
    index = ckpt / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    shard = sorted(set(data["weight_map"].values()))[-1]
    (ckpt / shard).unlink()
    out = tmp_path / "out"
    with pytest.raises(
        CheckpointError, match=rf"{shard}: shard listed in model\.safetensors\.index\.json is missing"
    ):
        _export(ckpt, out)
    _assert_nothing_left(out)


def test_unsupported_architecture(ckpt: Path, tmp_path: Path) -> None:
    checkpoints.set_config(ckpt, architectures=["FrobnicatorForCausalLM"])
    out = tmp_path / "out"
    with pytest.raises(
        CheckpointError, match=r"config\.json: architecture 'FrobnicatorForCausalLM' is not supported"
    ):
        _export(ckpt, out)
    _assert_nothing_left(out)


def test_missing_tokenizer(ckpt: Path, tmp_path: Path) -> None:
    (ckpt / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match=r"no tokenizer"):
        _export(ckpt, tmp_path / "out")


def test_adapter_for_different_base(tmp_path: Path, llama_ckpt: Path) -> None:
    other = checkpoints.llama(tmp_path / "other", hidden_size=128, intermediate_size=256)
    adapter = checkpoints.lora(other, tmp_path / "other-lora", steps=1)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "acme/tiny-base"
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    with pytest.raises(
        CheckpointError,
        match=r"adapter_model\.safetensors: .*lora_A.* has shape \[4, 128\], "
        r"incompatible with base .*\(adapter for a different base\?\)",
    ):
        _export(llama_ckpt, out, adapter=adapter, release=None)
    _assert_nothing_left(out)


def test_adapter_base_name_mismatch(tmp_path: Path, llama_ckpt: Path, llama_lora: Path) -> None:
    adapter = checkpoints.copy_tree(llama_lora, tmp_path / "lora")
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "acme/some-other-model"
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    spec = tmp_path / "release.yaml"
    spec.write_text("base_model: acme/tiny-base\n")
    with pytest.raises(
        CheckpointError,
        match=r"adapter_config\.json: base_model_name_or_path "
        r"'acme/some-other-model' does not match the base \(acme/tiny-base\)",
    ):
        _export(llama_ckpt, tmp_path / "out", adapter=adapter, release=spec)


def test_adapter_unknown_target_module(tmp_path: Path, llama_ckpt: Path, llama_lora: Path) -> None:
    adapter = checkpoints.copy_tree(llama_lora, tmp_path / "lora")
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["target_modules"] = ["q_proj", "wqkv"]
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"target_modules \['wqkv'\] do not exist in the base model"):
        _export(llama_ckpt, tmp_path / "out", adapter=adapter)


def test_output_parent_is_a_file(llama_ckpt: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputError, match=r"file: output parent directory does not exist"):
        _export(llama_ckpt, blocker / "out")


def test_output_not_writable(llama_ckpt: Path) -> None:
    # /proc refuses new directories even to root, unlike chmod-based tests.
    with pytest.raises(OutputError, match=r"/proc: output directory is not writable"):
        _export(llama_ckpt, Path("/proc/ggufship-out"))


def test_output_not_empty(llama_ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(OutputError, match=r"exists and is not empty \(use --force"):
        _export(llama_ckpt, out)
    assert (out / "keep.txt").read_text() == "precious"


def test_bad_quant_and_name(llama_ckpt: Path, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"--quant 'Q9_Z': unknown quantization; valid: .*Q4_K_M"):
        _export(llama_ckpt, tmp_path / "out", quants=("Q9_Z",))
    with pytest.raises(UsageError, match=r"--name 'Bad Name'"):
        export_checkpoint(
            ExportRequest(checkpoint=llama_ckpt, out_dir=tmp_path / "o", name="Bad Name", version="1")
        )


def test_bad_release_spec(llama_ckpt: Path, tmp_path: Path) -> None:
    spec = tmp_path / "release.yaml"
    spec.write_text("hyperparameters: {lr: 0.1}\nevaluations:\n  - dataset: x\n    metrics: {acc: high}\n")
    with pytest.raises(
        ReleaseSpecError, match=r"release\.yaml: invalid release spec: evaluations\.0\.metrics\.acc"
    ):
        _export(llama_ckpt, tmp_path / "out", release=spec)
    spec.write_text("datasets:\n  - name: d\n    path: nowhere\n")
    with pytest.raises(ReleaseSpecError, match=r"datasets\.0\.path: .*nowhere does not exist"):
        _export(llama_ckpt, tmp_path / "out", release=spec)
    spec.write_text("datasets:\n  - name: d\n    path: .\n    fingerprint: blake3:" + "0" * 64 + "\n")
    with pytest.raises(ReleaseSpecError, match=r"datasets\.0\.fingerprint: blake3:0+ != computed blake3:"):
        _export(llama_ckpt, tmp_path / "out", release=spec)
    spec.write_text("name: other\n")
    with pytest.raises(ReleaseSpecError, match=r"name 'other' disagrees with --name 'bad'"):
        _export(llama_ckpt, tmp_path / "out", release=spec)


def test_converter_failure_leaves_nothing(tmp_path: Path) -> None:
    """A failure inside llama.cpp's converter (Qwen2 wants a GPT-2 BPE tokenizer it can
    classify) is reported with the converter's own message, and no output survives."""
    from ggufship.errors import ConversionError

    ckpt = checkpoints.qwen2(tmp_path / "src")
    out = tmp_path / "out"
    with pytest.raises(ConversionError, match=r"llama\.cpp converter failed"):
        _export(ckpt, out)
    _assert_nothing_left(out)


def test_verify_catches_tampering(tmp_path: Path, llama_ckpt: Path) -> None:
    out = tmp_path / "out"
    _export(llama_ckpt, out, quants=("F16", "Q8_0"))
    assert verify_export(out).ok
    gguf = out / "bad-1-Q8_0.gguf"
    data = bytearray(gguf.read_bytes())
    data[-10] ^= 0xFF
    gguf.write_bytes(bytes(data))
    (out / "README.md").write_text("edited")
    report = verify_export(out, raise_on_error=False)
    assert not report.ok
    assert any(p.startswith("bad-1-Q8_0.gguf: sha256 ") for p in report.problems)
    assert any(p.startswith("README.md: size ") for p in report.problems)
    # sha256sum agrees that the GGUF is bad
    rc = subprocess.run(
        ["sha256sum", "-c", "bad-1-Q8_0.gguf.sha256"], cwd=out, capture_output=True
    ).returncode
    assert rc != 0
    # CLI: non-zero exit naming each mismatch
    proc = subprocess.run(
        [sys.executable, "-m", "ggufship.cli.main", "verify", str(out)], capture_output=True, text=True
    )
    assert proc.returncode == 8
    assert "bad-1-Q8_0.gguf: sha256" in proc.stderr and "README.md: size" in proc.stderr
    (out / "bad-1-F16.gguf").unlink()
    assert "bad-1-F16.gguf: missing" in verify_export(out, raise_on_error=False).problems


def test_cli_export_and_exit_codes(tmp_path: Path, llama_ckpt: Path) -> None:
    out = tmp_path / "out"
    cli = [sys.executable, "-m", "ggufship.cli.main"]
    ok = subprocess.run(
        [
            *cli,
            "export",
            str(llama_ckpt),
            "-o",
            str(out),
            "--name",
            "cli",
            "--version",
            "2",
            "--quant",
            "q8_0",
            "--no-tokenizer-check",
            "--json",
        ],
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["files"][0]["path"] == "cli-2-Q8_0.gguf"
    again = subprocess.run(
        [*cli, "export", str(llama_ckpt), "-o", str(out), "--name", "cli", "--version", "2"],
        capture_output=True,
        text=True,
    )
    assert again.returncode == 6 and "not empty" in again.stderr
    missing = subprocess.run(
        [*cli, "export", str(tmp_path / "nope"), "-o", str(tmp_path / "o2"), "--name", "x", "--version", "1"],
        capture_output=True,
        text=True,
    )
    assert missing.returncode == 4 and "checkpoint directory does not exist" in missing.stderr
    assert subprocess.run([*cli, "verify", str(out)], capture_output=True).returncode == 0
    shutil.rmtree(out)
