from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures import checkpoints

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _restore_root_logging() -> Iterator[None]:
    """The CLI's ``main()`` (called in-process by some tests) replaces the root handlers with one on
    the test's captured stderr, which pytest closes afterwards; put the previous ones back so later
    tests' server threads do not log into a closed stream."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(scope="session")
def ckpt_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("checkpoints")


@pytest.fixture(scope="session")
def llama_ckpt(ckpt_root: Path) -> Path:
    return checkpoints.llama(ckpt_root)


@pytest.fixture(scope="session")
def llama_lora(ckpt_root: Path, llama_ckpt: Path) -> Path:
    return checkpoints.lora(llama_ckpt, ckpt_root / "llama-lora")


@pytest.fixture(scope="session")
def release_yaml(ckpt_root: Path) -> Path:
    data = ckpt_root / "data"
    data.mkdir()
    (data / "b.jsonl").write_text('{"x": 2}\n')
    (data / "a.jsonl").write_text('{"x": 1}\n')
    spec = ckpt_root / "release.yaml"
    spec.write_text(
        """
base_model: acme/tiny-base
license: apache-2.0
description: Tiny test fine-tune.
tags: [test]
hyperparameters: {learning_rate: 0.0002, epochs: 3, lora_r: 4}
datasets:
  - name: acme/support-tickets
    uri: s3://datasets/support-tickets
    path: data
evaluations:
  - task: text-generation
    dataset: acme/support-eval
    metrics: {accuracy: 0.81, perplexity: 7.25}
"""
    )
    return spec


@pytest.fixture(scope="session")
def tiny_export(
    tmp_path_factory: pytest.TempPathFactory, llama_ckpt: Path, llama_lora: Path, release_yaml: Path
) -> Path:
    """One export (tiny Llama + LoRA, name ``tiny``, version ``1.0.0``, default quantizations)
    shared by the sign, publish and serve tests. Read-only: copy it (``shutil.copytree``)
    before changing anything in it."""
    from ggufship.export import ExportRequest, export_checkpoint

    out = tmp_path_factory.mktemp("tiny-export") / "tiny-1.0.0"
    export_checkpoint(
        ExportRequest(
            checkpoint=llama_ckpt,
            out_dir=out,
            name="tiny",
            version="1.0.0",
            adapter=llama_lora,
            release=release_yaml,
        )
    )
    return out
