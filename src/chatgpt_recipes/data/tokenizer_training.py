"""A byte-level BPE tokenizer (GPT-2's kind) trained on a corpus with the `tokenizers` library: every UTF-8 text,
Chinese included, encodes and decodes back exactly, since any byte missing from the merges is its own token."""

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from chatgpt_recipes.runtime.errors import ConfigError

EOS_TOKEN = "<|endoftext|>"  # GPT-2's: ends every document, and every turn under the fallback chat template
PAD_TOKEN = "<|pad|>"  # distinct from EOS, so masking padding never masks the EOS the model must learn
SPECIAL_TOKENS = [EOS_TOKEN, PAD_TOKEN]
BYTE_ALPHABET_SIZE = 256


def check_vocab_size(vocab_size: int) -> None:
    smallest = BYTE_ALPHABET_SIZE + len(SPECIAL_TOKENS)
    if vocab_size < smallest:
        raise ConfigError(f"vocab_size={vocab_size} is smaller than the {BYTE_ALPHABET_SIZE}-byte alphabet plus "
                          f"{len(SPECIAL_TOKENS)} special tokens {SPECIAL_TOKENS}: use at least {smallest}")


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, model_max_length: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE with up to `vocab_size` tokens learned from `texts` (fewer if the corpus has fewer
    merges to learn); EOS and pad special tokens as above; loadable with AutoTokenizer once saved."""
    check_vocab_size(vocab_size)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=True)
    bpe.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN,
                                   pad_token=PAD_TOKEN, model_max_length=model_max_length)
