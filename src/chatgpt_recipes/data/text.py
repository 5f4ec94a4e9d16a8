"""Plain-text corpora for (continued) pretraining: text files, json/jsonl/csv/parquet with a text column, or a hub
dataset, in memory or streamed; documents joined with EOS between them and cut into fixed-length token blocks."""

import glob
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path

from datasets import Dataset, IterableDataset, load_dataset
from datasets.exceptions import DatasetGenerationError
from datasets.fingerprint import Hasher

from chatgpt_recipes.data.rows import DEFECT, UNUSABLE, SkipLog
from chatgpt_recipes.runtime.errors import DataError
from chatgpt_recipes.runtime.output import say

logger = logging.getLogger(__name__)

CORPUS_FORMATS = {".txt": "text", ".text": "text", ".md": "text", ".json": "json", ".jsonl": "json",
                  ".csv": "csv", ".parquet": "parquet"}


def load_documents(source: str, text_field: str = "text", split: str = "train", config_name: str | None = None,
                   streaming: bool = False, txt_sample_by: str = "line") -> Dataset | IterableDataset:
    """The documents of a corpus, one per row: a local file or glob (`.txt`: one document per line, paragraph or
    file by `txt_sample_by`; json/jsonl/csv/parquet: the `text_field` column) or a hub dataset. Streamed as an
    IterableDataset when `streaming`, so memory does not grow with the corpus."""
    files = sorted(glob.glob(str(Path(source).expanduser())))
    if files:
        suffixes = {Path(f).suffix for f in files}
        if len(suffixes) > 1 or not suffixes <= CORPUS_FORMATS.keys():
            raise DataError(f"{source}: corpus files must all be one of {sorted(CORPUS_FORMATS)}, found {sorted(suffixes)}")
        if all(Path(f).stat().st_size == 0 for f in files):
            raise DataError(f"{source}: the corpus holds no documents (empty file)")
        builder = CORPUS_FORMATS[suffixes.pop()]
        kwargs = {"sample_by": txt_sample_by} if builder == "text" else {}
        try:
            documents = load_dataset(builder, data_files=files, split="train", streaming=streaming, **kwargs)
        except DatasetGenerationError as error:
            raise DataError(f"{source}: could not read the corpus as {builder}: {error.__cause__ or error}") from error
        if builder == "text":
            text_field = "text"  # the text builder's only column
    elif Path(source).suffix in CORPUS_FORMATS or source.startswith((".", "/", "~")):
        raise DataError(f"corpus file not found: {source}")
    else:
        try:
            documents = load_dataset(source, config_name, split=split, streaming=streaming)
        except Exception as error:
            raise DataError(f"could not load dataset '{source}' (config {config_name}, split '{split}'): not a local "
                            f"file, and the hub did not serve it ({type(error).__name__}: {error})") from error
    if isinstance(documents, Dataset) and len(documents) == 0:
        raise DataError(f"{source}: the corpus holds no documents")
    columns = documents.column_names
    if columns is None:  # a streamed hub dataset may not declare its features: look at the first row
        first = next(iter(documents), None)
        if first is None:
            raise DataError(f"{source}: the corpus holds no documents")
        columns = list(first)
    if text_field not in columns:
        raise DataError(f"{source}: no text column '{text_field}' (columns: {sorted(columns)}); "
                        "set dataset_text_field to the column that holds the text")
    return documents.select_columns([text_field]).rename_column(text_field, "text") if text_field != "text" \
        else documents.select_columns(["text"])


def split_documents(documents, eval_documents: int, source: str):
    """(train, held-out): the first `eval_documents` documents are held out, the rest train (streaming too)."""
    if eval_documents <= 0:
        return documents, None
    if isinstance(documents, Dataset) and eval_documents >= len(documents):
        raise DataError(f"{source}: holding out {eval_documents} documents leaves nothing to train on "
                        f"({len(documents)} documents); lower eval_documents")
    return documents.skip(eval_documents), documents.take(eval_documents)


def token_blocks(documents: Iterable[dict], tokenizer, block_size: int, source: str, first_row: int = 1,
                 batch_size: int = 256, streamed: bool = False) -> Iterator[dict]:
    """Blocks of exactly `block_size` token ids (the last one may be shorter) cut from the documents' tokens
    with EOS after each document: every token of the corpus lands in exactly one block, in order. Blank and
    non-text documents are skipped (counted here when streamed, else by `document_skips`)."""
    eos = tokenizer.eos_token_id
    buffer, total_tokens, blank, row = [], 0, 0, first_row - 1

    def cut(tokens: list[int]):
        start = 0
        while len(tokens) - start >= block_size:
            yield {"input_ids": tokens[start:start + block_size]}
            start += block_size
        del tokens[:start]

    def tokenized(batch: list[str]):
        # split_special_tokens: a literal "<|endoftext|>" in the text stays text, never a document boundary
        return tokenizer(batch, add_special_tokens=False, split_special_tokens=True, verbose=False)["input_ids"]

    batch = []
    for document in documents:
        row += 1
        text = document["text"]
        if not isinstance(text, str) or not text.strip():  # counted by document_skips (in memory)
            blank += 1
            continue
        batch.append(text)
        if len(batch) == batch_size:
            for ids in tokenized(batch):
                buffer += ids + [eos]
                total_tokens += len(ids) + 1
            batch = []
            yield from cut(buffer)
    for ids in tokenized(batch) if batch else []:
        buffer += ids + [eos]
        total_tokens += len(ids) + 1
    yield from cut(buffer)
    if blank and streamed:
        say(f"[data] {source}: skipped {blank} blank or non-text documents", flush=True)
    if total_tokens == 0:
        raise DataError(f"{source}: the corpus holds no text")
    if total_tokens < block_size:
        raise DataError(f"{source}: the corpus holds {total_tokens} tokens, fewer than one block of "
                        f"block_size={block_size}; add text or lower block_size")
    if buffer:
        yield {"input_ids": buffer}


def document_skips(documents: Dataset, source: str, first_row: int = 1) -> SkipLog:
    """The row policy for an in-memory corpus: a non-text value is a defect (counted towards
    max_skipped_fraction), a blank document an unusable row; both are skipped, not errors."""
    skips = SkipLog()
    for row, text in enumerate(documents["text"], start=first_row):
        if not isinstance(text, str):
            skips.add(source, row, "text", f"field 'text' must be text, found {type(text).__name__}", DEFECT)
        elif not text.strip():
            skips.add(source, row, "text", "blank document", UNUSABLE)
    return skips


def block_dataset(documents, tokenizer, block_size: int, source: str, first_row: int = 1):
    """`token_blocks` as a Dataset (built once, cached on disk under a fingerprint of the documents, tokenizer
    and block size) or, for streamed documents, as an IterableDataset that tokenizes as training reads it."""
    kwargs = dict(documents=documents, tokenizer=tokenizer, block_size=block_size, source=source, first_row=first_row)
    if isinstance(documents, IterableDataset):
        return IterableDataset.from_generator(token_blocks, gen_kwargs=dict(kwargs, streamed=True))
    fingerprint = Hasher.hash([documents._fingerprint, tokenizer.backend_tokenizer.to_str(),
                               tokenizer.eos_token_id, block_size, source, first_row])
    try:
        return Dataset.from_generator(token_blocks, gen_kwargs=kwargs, fingerprint=fingerprint)
    except DatasetGenerationError as error:  # datasets wraps our message in its own; show ours
        if isinstance(error.__cause__, DataError):
            raise error.__cause__ from None
        raise
