"""Build tiny Llama / Mistral / Qwen2 models from config, with a BPE tokenizer trained locally.

Nothing is downloaded: the tokenizer is trained with `tokenizers` on a corpus of local files (plus a
built-in one), the weights are initialised from config, and the result is saved with
`save_pretrained` so every stage can use it as `model_name_or_path`.

    python -m pipeline.tiny --config recipes/tiny/model.yaml [--output_dir outputs/tiny/base]
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import string
import tempfile
from pathlib import Path
from typing import Iterator, Literal

from pipeline.config import RecipeError, cli, parse
from pipeline.io import read_jsonl, write_stage_result

logger = logging.getLogger(__name__)

# ChatML with {% generation %} markers, so TRL's `assistant_only_loss` can mask everything but replies.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{ '\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"]


@dataclasses.dataclass
class TinyModelSpec:
    output_dir: str = dataclasses.field(default="outputs/tiny/base", metadata={"help": "Where to save."})
    arch: Literal["llama", "mistral", "qwen2"] = "llama"
    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 8
    num_key_value_heads: int | None = dataclasses.field(
        default=None, metadata={"help": "Fewer than num_attention_heads gives grouped-query attention."})
    intermediate_size: int | None = dataclasses.field(default=None, metadata={"help": "Default: 4 x hidden."})
    vocab_size: int = dataclasses.field(default=1024, metadata={"help": "Target BPE vocabulary size."})
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    sliding_window: int | None = dataclasses.field(default=None, metadata={"help": "Mistral/Qwen2 only."})
    tie_word_embeddings: bool = True
    corpus: list[str] = dataclasses.field(
        default_factory=list,
        metadata={"help": "Text (.txt) or .jsonl files whose strings train the tokenizer, plus a built-in corpus."})
    seed: int = 0
    overwrite: bool = False

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("key 'hidden_size' must be divisible by 'num_attention_heads'")
        kv = self.num_key_value_heads or self.num_attention_heads
        if self.num_attention_heads % kv:
            raise ValueError("key 'num_key_value_heads' must divide 'num_attention_heads'")
        if self.sliding_window is not None and self.arch == "llama":
            raise ValueError("key 'sliding_window' is only for arch mistral or qwen2")
        if self.vocab_size < 300:
            raise ValueError("key 'vocab_size' must be >= 300 (256 byte symbols + specials + merges)")


def _builtin_corpus() -> Iterator[str]:
    # Digits, letters and punctuation in the shapes the task world and chat data use.
    yield string.printable
    for role in ("system", "user", "assistant"):
        yield f"<|im_start|>{role}\n"
    words = ("the answer is step first then so because sum total key value passkey number question "
             "explain reason result check list sort reverse copy find remember text find lookup what").split()
    for i in range(400):
        yield " ".join(words[(i * 7 + j) % len(words)] for j in range(12)) + f" {i} = {i * 3}."


def _corpus_texts(paths: list[str]) -> Iterator[str]:
    yield from _builtin_corpus()
    for p in paths:
        path = Path(p)
        if path.suffix == ".jsonl":
            for _, row in read_jsonl(path, "key 'corpus'"):
                yield from _strings(row)
            continue
        if not path.is_file():
            raise RecipeError(f"key 'corpus': {p} not found")
        with path.open() as fh:
            yield from fh


def _strings(obj) -> Iterator[str]:
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v)


def train_tokenizer(spec: TinyModelSpec):
    """A byte-level BPE (every string encodes; no <unk>) with digits split one per token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus_texts(spec.corpus), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|im_end|>", pad_token="<|pad|>",
        unk_token=None, model_max_length=spec.max_position_embeddings)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def model_config(spec: TinyModelSpec, tokenizer):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[spec.arch]
    kwargs = dict(
        vocab_size=len(tokenizer), hidden_size=spec.hidden_size, num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads or spec.num_attention_heads,
        intermediate_size=spec.intermediate_size or 4 * spec.hidden_size,
        max_position_embeddings=spec.max_position_embeddings, rope_theta=spec.rope_theta,
        tie_word_embeddings=spec.tie_word_embeddings,
        # Never pad_token_id == bos_token_id: the pad embedding is zeroed and frozen.
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if spec.arch != "llama":
        kwargs["sliding_window"] = spec.sliding_window
        if spec.arch == "qwen2":
            kwargs["use_sliding_window"] = spec.sliding_window is not None
    return cls(**kwargs)


def build_tiny_model(spec: TinyModelSpec) -> Path:
    """Build (or reuse) the tiny model of `spec` in `spec.output_dir`; written atomically."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    out = Path(spec.output_dir)
    marker = out / "tiny_spec.json"
    wanted = dataclasses.asdict(spec)
    if out.exists() and not spec.overwrite:
        if marker.is_file() and json.loads(marker.read_text()) == wanted:
            logger.info("tiny model already built at %s", out)
            return out
        raise RecipeError(f"{out}: exists and was not built from this spec (set overwrite: true to replace it)")

    torch.manual_seed(spec.seed)
    tokenizer = train_tokenizer(spec)
    config = model_config(spec, tokenizer)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, do_sample=False)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "tiny_spec.json").write_text(json.dumps(wanted, indent=2))
        n_params = sum(p.numel() for p in model.parameters())
        write_stage_result(tmp, "base", {"parameters": n_params, "vocab_size": len(tokenizer), "arch": spec.arch,
                                         "layers": spec.num_hidden_layers, "heads": spec.num_attention_heads},
                           {"model": str(out)})
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("built tiny %s: %.2fM parameters, vocab %d -> %s", spec.arch, n_params / 1e6, len(tokenizer), out)
    return out


def load_spec(path: str, overrides: list[str] | None = None) -> TinyModelSpec:
    (spec,), _, _ = parse([TinyModelSpec], ["--config", path] + list(overrides or []), prog="pipeline.tiny")
    return spec


def main(argv: list[str] | None = None) -> Path:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    (spec,), _, _ = parse([TinyModelSpec], argv, prog="python -m pipeline.tiny")
    return build_tiny_model(spec)


if __name__ == "__main__":
    cli(main)
