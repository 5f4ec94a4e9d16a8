"""recipes/pretrain.py and its data and tokenizer modules: token blocks, the trained tokenizer, streaming, bad
input, a tiny run from scratch that the SFT recipe then takes by path, and continued pretraining (full and LoRA)."""

import json
from pathlib import Path

import pytest
import torch
from conftest import REPO, run_recipe
from safetensors.torch import load_file
from transformers import AutoTokenizer, DataCollatorForLanguageModeling, GPT2Config, GPT2LMHeadModel

from chatgpt_recipes.cli import parse_config
from chatgpt_recipes.data.text import block_dataset, load_documents, split_documents, token_blocks
from chatgpt_recipes.data.tokenizer_training import train_bpe_tokenizer
from chatgpt_recipes.runtime.errors import ConfigError, DataError

pytestmark = pytest.mark.slow  # the quick lane (README, Tests) leaves these out

WIKI = REPO / "data" / "wiki_demo.txt"


@pytest.fixture(scope="module")
def wiki_articles() -> list[str]:
    return WIKI.read_text(encoding="utf-8").splitlines()


@pytest.fixture(scope="module")
def tokenizer(wiki_articles):
    return train_bpe_tokenizer(wiki_articles[:10], vocab_size=512, model_max_length=64)


@pytest.fixture
def small_corpus(tmp_path, wiki_articles) -> Path:
    """12 short articles (the first 1,500 characters of each), one per line, with one blank line."""
    lines = [article[:1500] for article in wiki_articles[:12]]
    lines.insert(5, "")
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def run_pretrain(*args: str):
    import pretrain

    pretrain.main(*parse_config((pretrain.PretrainConfig, pretrain.ModelArguments), "pretrain/tiny_gpt_wiki.yaml",
                                ["--report_to", "none", "--save_strategy", "no", "--logging_steps", "5", *args]))


def test_blocks_cover_the_corpus_once_with_eos_between_documents(tokenizer, wiki_articles, capsys):
    documents = [{"text": article[:700]} for article in wiki_articles[:8]] + [{"text": "  "}]
    blocks = [block["input_ids"] for block in token_blocks(documents, tokenizer, 64, "corpus", batch_size=3,
                                                           streamed=True)]

    expected = []
    for document in documents[:-1]:
        expected += tokenizer(document["text"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert sum(blocks, []) == expected  # every token once, in order
    assert all(len(block) == 64 for block in blocks[:-1]) and 0 < len(blocks[-1]) < 64
    flat = torch.tensor(expected)
    assert (flat == tokenizer.eos_token_id).sum() == 8  # one EOS per document, the blank one skipped ...
    assert "skipped 1 blank or non-text documents" in capsys.readouterr().out  # ... and counted
    ends = torch.nonzero(flat == tokenizer.eos_token_id).flatten()
    decoded = [tokenizer.decode(expected[start + 1:end]) for start, end in zip([-1] + ends[:-1].tolist(), ends)]
    assert decoded == [document["text"] for document in documents[:-1]]


def test_padding_of_the_last_block_never_enters_the_loss(tokenizer, wiki_articles):
    blocks = list(token_blocks([{"text": wiki_articles[3][:800]}], tokenizer, 64, "corpus"))
    full, tail = blocks[0]["input_ids"], blocks[-1]["input_ids"]
    assert 1 < len(tail) < 64 and tail[-1] == tokenizer.eos_token_id
    batch = DataCollatorForLanguageModeling(tokenizer, mlm=False)([{"input_ids": full}, {"input_ids": tail}])
    padding = batch["attention_mask"] == 0
    assert padding[1].sum() == 64 - len(tail)
    assert (batch["labels"][padding] == -100).all()
    assert torch.equal(batch["labels"][~padding], batch["input_ids"][~padding])  # EOS is trained, not masked

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_layer=1, n_embd=32, n_head=2, n_positions=64,
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    model = GPT2LMHeadModel(config).eval()
    alone = model(input_ids=torch.tensor([tail]), labels=torch.tensor([tail])).loss
    padded = model(input_ids=batch["input_ids"][1:], attention_mask=batch["attention_mask"][1:],
                   labels=batch["labels"][1:]).loss
    assert torch.allclose(alone, padded, atol=1e-5)


def test_trained_tokenizer_round_trips_text_including_chinese(tokenizer, tmp_path):
    texts = ["Anarchism is a political philosophy.", "维基百科是一个自由内容的百科全书。", "naïve café 🙂\n\ttabs  and  spaces ",
             "a literal <|endoftext|> in text"]
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert len(reloaded) == 512 and reloaded.eos_token == "<|endoftext|>" and reloaded.pad_token == "<|pad|>"
    for text in texts:
        ids = reloaded(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        assert reloaded.decode(ids) == text
    assert len(reloaded("Anarchism is a political philosophy.")["input_ids"]) < 20  # merges were learned


def test_streaming_sees_the_same_tokens_as_in_memory(tokenizer, tmp_path, wiki_articles):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": i, "body": a[:800]}) + "\n" for i, a in enumerate(wiki_articles[:9])))
    blocks = {}
    for streaming in (False, True):
        documents = load_documents(str(corpus), text_field="body", streaming=streaming)
        train, held_out = split_documents(documents, 2, str(corpus))
        blocks[streaming] = [[b["input_ids"] for b in block_dataset(part, tokenizer, 64, str(corpus))]
                             for part in (train, held_out)]
    assert blocks[True] == blocks[False]
    assert sum(len(b) for b in blocks[True][0]) > 64 * 10


def test_each_bad_input_yields_its_message(tmp_path, small_corpus, tiny_gpt2_dir):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(DataError, match="empty.txt: the corpus holds no documents"):
        run_pretrain("--dataset_name", str(empty))
    short = tmp_path / "short.txt"
    short.write_text("one short document\nanother one\na third\n")
    with pytest.raises(DataError, match=r"short.txt: the corpus holds \d+ tokens, fewer than one block of "
                                        "block_size=512"):
        run_pretrain("--dataset_name", str(short), "--eval_documents", "1", "--vocab_size", "300")
    with pytest.raises(DataError, match=r"short.txt: the corpus holds \d+ tokens, fewer than one block"):
        run_pretrain("--dataset_name", str(short), "--eval_documents", "1", "--vocab_size", "300",
                     "--streaming", "true", "--max_steps", "1")
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"content": "some text"}\n{"content": "more text"}\n')
    with pytest.raises(DataError, match=r"rows.jsonl: no text column 'text' \(columns: \['content'\]\)"):
        run_pretrain("--dataset_name", str(rows))
    with pytest.raises(ConfigError, match="vocab_size=200 is smaller than the 256-byte alphabet plus 2 special"):
        run_pretrain("--vocab_size", "200")
    with pytest.raises(ConfigError, match=r"block_size=1024 is larger than the context of tiny \(512 positions\)"):
        run_pretrain("--dataset_name", str(small_corpus), "--block_size", "1024", "--vocab_size", "300")
    with pytest.raises(ConfigError, match=r"block_size=2048 is larger than the context of .*tiny-gpt2.* \(1024"):
        run_pretrain("--model_name_or_path", tiny_gpt2_dir, "--dataset_name", str(small_corpus),
                     "--block_size", "2048")


def test_tiny_pretraining_lowers_perplexity_and_feeds_sft(tmp_path, small_corpus):
    out = tmp_path / "pretrained"
    run_pretrain("--dataset_name", str(small_corpus), "--output_dir", str(out), "--vocab_size", "512",
                 "--model_config_overrides", "n_layer=2,n_embd=64,n_positions=64", "--block_size", "64",
                 "--per_device_train_batch_size", "8", "--max_steps", "12", "--warmup_steps", "2",
                 "--learning_rate", "1e-2", "--eval_strategy", "no",
                 "--sample_max_new_tokens", "8")
    history = json.loads((out / "log_history.json").read_text())
    perplexities = [entry["eval_perplexity"] for entry in history if "eval_perplexity" in entry]
    assert perplexities[0] > 400 and perplexities[-1] < 0.6 * perplexities[0]  # ~vocab size at random init
    assert "Held-out perplexity (before -> after)" in (out / "report.md").read_text()

    # SFT on chats: the pretrained tokenizer has no chat template, so the SFT side gives it the fallback one
    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Name a number above {i}."},
                                                      {"role": "assistant", "content": f"{i + 1} is one."}]}) + "\n"
                             for i in range(12)))
    sft_out = tmp_path / "sft"
    run_recipe("sft_lora.py", "--model_name_or_path", out, "--dataset_name", chats, "--output_dir", sft_out,
               "--max_steps", "2", "--max_length", "64", "--eval_split_size", "0",
               "--eval_strategy", "no", "--save_strategy", "no", "--report_to", "none", "--bf16", "false",
               "--per_device_train_batch_size", "4", "--sample_max_new_tokens", "4")
    assert (sft_out / "adapter_config.json").is_file()


def test_continued_pretraining_changes_weights_and_keeps_the_tokenizer(tmp_path, small_corpus, tiny_gpt2_dir):
    original_tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2_dir)
    original = load_file(Path(tiny_gpt2_dir) / "model.safetensors")
    common = ["--model_name_or_path", tiny_gpt2_dir, "--dataset_name", str(small_corpus), "--block_size", "64",
              "--max_steps", "3", "--eval_documents", "0", "--eval_strategy", "no", "--eval_on_start", "false",
              "--sample_max_new_tokens", "4"]

    run_pretrain(*common, "--output_dir", str(tmp_path / "full"), "--learning_rate", "1e-3")
    tuned = load_file(tmp_path / "full" / "model.safetensors")
    assert not torch.equal(tuned["transformer.h.0.attn.c_attn.weight"], original["transformer.h.0.attn.c_attn.weight"])
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "full")
    assert original_tokenizer.get_vocab().items() <= tokenizer.get_vocab().items()  # only a pad token added
    text = "Anarchism is a political philosophy"
    assert tokenizer(text)["input_ids"] == original_tokenizer(text)["input_ids"]

    run_pretrain(*common, "--output_dir", str(tmp_path / "lora"), "--use_peft", "true", "--lora_r", "4")
    adapter = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert Path(adapter["base_model_name_or_path"]).resolve() == Path(tiny_gpt2_dir).resolve()
    from chatgpt_recipes.modeling.loading import load_for_inference

    _, model = load_for_inference(str(tmp_path / "lora"))  # as SFT, chat and evaluation load it
    assert any("lora_" in name for name, _ in model.named_parameters())


def test_non_text_and_blank_documents_are_counted_skips_not_errors(tmp_path, wiki_articles):
    """The row policy of every loader: one odd row does not refuse the corpus; it is skipped, counted and listed."""
    corpus = tmp_path / "mixed.jsonl"
    rows = [{"text": article} for article in wiki_articles[:10]]
    rows[3], rows[6] = {"text": 5}, {"text": "   "}
    corpus.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "out"
    run_pretrain("--dataset_name", str(corpus), "--output_dir", str(out), "--max_steps", "2",
                 "--block_size", "64", "--vocab_size", "300", "--eval_documents", "1", "--max_skipped_fraction", "0.2")
    skipped = [json.loads(line) for line in (out / "skipped_rows.jsonl").read_text().splitlines()]
    assert [(r["row"], r["field"], r["kind"]) for r in skipped] == [(4, "text", "defect"), (7, "text", "unusable")]
    assert "must be text, found int" in skipped[0]["reason"]
    assert "## Skipped rows" in (out / "report.md").read_text()

    rows[1] = rows[2] = {"text": None}
    corpus.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(DataError, match=r"3 of 10 rows \(30%\) are defective, more than max_skipped_fraction=0.2"):
        run_pretrain("--dataset_name", str(corpus), "--output_dir", str(tmp_path / "out2"), "--max_steps", "1",
                     "--max_skipped_fraction", "0.2")
