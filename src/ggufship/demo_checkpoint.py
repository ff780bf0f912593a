"""Tiny, real, seeded Hugging Face checkpoints for the demo and the tests.

Builds a Llama-style byte-fallback BPE tokenizer trained on local text, a
randomly initialised causal LM of a few hundred thousand parameters, and
optionally a PEFT LoRA adapter trained a few steps on CPU. No downloads.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from transformers import PretrainedConfig

logger = logging.getLogger(__name__)

Architecture = Literal["llama", "qwen2", "mistral"]

_CORPUS = """\
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.
def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a
Models are exported to GGUF, signed, published and rolled out behind a canary.
La exportación del modelo se firma y se publica. Das Modell wird signiert.
Le modèle est publié dans le registre OCI et dans le dépôt GitOps.
<|user|> What is the capital of France? <|assistant|> Paris is the capital of France.
Latency p99, error ratio and a Kolmogorov-Smirnov test gate the rollout.
1234567890 + 987654321 = 2222222211; {"key": [1, 2, 3], "ok": true}
"""

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|> ' + message['content'] + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|> ' }}{% endif %}"
)

_SPECIAL = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]


@dataclass(frozen=True)
class TinySpec:
    """Dimensions of a tiny model. ``hidden_size`` 256 allows K-quants."""

    architecture: Architecture = "llama"
    hidden_size: int = 256
    intermediate_size: int = 512
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    vocab_size: int = 512
    max_positions: int = 512
    seed: int = 0


def build_tokenizer(out_dir: Path, vocab_size: int) -> None:
    """Train a Llama-style byte-fallback BPE (Metaspace) on the built-in corpus."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=_SPECIAL + byte_tokens,
        show_progress=False,
        initial_alphabet=[],
    )
    tok.train_from_iterator(_CORPUS.splitlines() * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        additional_special_tokens=_SPECIAL[3:],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir)
    # Tell the converter and transformers what family this tokenizer is.
    cfg_path = out_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "LlamaTokenizerFast"
    cfg["add_bos_token"] = True
    cfg["add_eos_token"] = False
    cfg["legacy"] = False
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def _model_config(spec: TinySpec, vocab_size: int) -> PretrainedConfig:
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    common = {
        "vocab_size": vocab_size,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "max_position_embeddings": spec.max_positions,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "tie_word_embeddings": False,
    }
    if spec.architecture == "llama":
        return LlamaConfig(**common)
    if spec.architecture == "qwen2":
        return Qwen2Config(**common)
    return MistralConfig(**common, sliding_window=None)


def build_checkpoint(
    out_dir: Path,
    spec: TinySpec | None = None,
    *,
    max_shard_size: str | None = None,
    safe_serialization: bool = True,
) -> Path:
    """Write a tiny seeded checkpoint (config, weights, tokenizer) to ``out_dir``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = spec or TinySpec()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    build_tokenizer(out_dir, spec.vocab_size)
    vocab = len(AutoTokenizer.from_pretrained(out_dir))
    torch.manual_seed(spec.seed)
    config = _model_config(spec, vocab)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    kwargs: dict[str, object] = {"safe_serialization": safe_serialization}
    if max_shard_size is not None:
        kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(out_dir, **kwargs)
    logger.info("built tiny %s checkpoint in %s", spec.architecture, out_dir)
    return out_dir


def build_lora_adapter(base_dir: Path, out_dir: Path, *, steps: int = 4, seed: int = 0) -> Path:
    """Train a LoRA adapter on ``base_dir`` for a few CPU steps and save it."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    peft_model = get_peft_model(model, lora)
    optim = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    samples = [torch.tensor([ids]) for ids in tok(_CORPUS.splitlines()[:4])["input_ids"]]
    peft_model.train()
    for step in range(steps):
        sample = samples[step % len(samples)]
        loss = peft_model(input_ids=sample, labels=sample).loss
        loss.backward()
        optim.step()
        optim.zero_grad()
    out_dir = Path(out_dir)
    peft_model.save_pretrained(out_dir)
    cfg_path = out_dir / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = str(Path(base_dir).resolve())
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return out_dir
