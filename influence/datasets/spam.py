"""Enron1 spam corpus (Metsis et al. 2006) as bag-of-words features (paper Sec. 5.4, Fig 6).

Reads ``spam/enron1.tar.gz`` straight from the archive: ``enron1/ham/*.txt`` (3,672) and
``enron1/spam/*.txt`` (1,500), decoded as latin-1. Label 1 = spam, 0 = ham.

Text -> tokens with spaCy: a blank English pipeline (``spacy.blank("en")``; the
pretrained ``en_core_web_sm`` cannot be downloaded at run time) with spaCy's lookup
lemmatiser from the ``spacy-lookups-data`` package when it is installed (else the
lower-cased token text is used, and the metadata says so). Text is lower-cased; stop
words, punctuation and non-alphabetic tokens are dropped. Then scikit-learn's
``CountVectorizer(min_df=5)`` is fitted on the training split only.

Split: the 5,172 emails (sorted by path) are shuffled with a seed; the first 4,137 are
the training set and the remaining 1,035 the test set (the original code's 80/20 sizes).
Featurised matrices are cached (npz, atomic) in ``cache_dir`` keyed by a hash of the
archive and every setting.
"""
from __future__ import annotations

import json
import logging
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .manifest import DataError, DataMissingError, fetch_hint, resolve_data_dir
from ..utils import hash_arrays, save_npz, sha256_file

logger = logging.getLogger(__name__)

N_TRAIN = 4137


def read_emails(data_dir=None) -> tuple[list[str], np.ndarray, list[str]]:
    """(texts, labels, member names) of every email in the archive, sorted by name."""
    root = resolve_data_dir(data_dir)
    path = root / "spam" / "enron1.tar.gz"
    if not path.is_file():
        raise DataMissingError(f"missing data file {path}. " + fetch_hint("spam", root))
    texts, labels, names = [], [], []
    try:
        with tarfile.open(path, "r:gz") as tar:
            for member in tar:
                parts = member.name.split("/")
                if not member.isfile() or len(parts) < 3 or parts[-2] not in ("ham", "spam") \
                        or not parts[-1].endswith(".txt"):
                    continue
                texts.append(tar.extractfile(member).read().decode("latin-1"))
                labels.append(1 if parts[-2] == "spam" else 0)
                names.append(member.name)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise DataError(f"{path} is corrupt or truncated ({exc}). " + fetch_hint("spam", root)) from exc
    if not texts:
        raise DataError(f"{path} holds no enron1/ham or enron1/spam emails")
    order = np.argsort(names)
    return [texts[i] for i in order], np.asarray(labels)[order], [names[i] for i in order]


def make_tokenizer():
    """A spaCy tokeniser + lookup lemmatiser; returns (function texts -> token lists, description)."""
    import spacy

    nlp = spacy.blank("en")
    how = "spacy.blank('en') tokens, lower-cased text"
    try:
        nlp.add_pipe("lemmatizer", config={"mode": "lookup"})
        nlp.initialize()
        how += ", spaCy lookup lemmas (spacy-lookups-data)"
    except Exception as exc:  # spacy-lookups-data missing: keep the plain tokens
        logger.warning("spaCy lookup lemmatiser unavailable (%s); using lower-cased tokens", exc)
        nlp = spacy.blank("en")
        how += ", no lemmatiser"

    def tokenize(texts):
        out = []
        for doc in nlp.pipe((t.lower() for t in texts), batch_size=64):
            lemmas = ((tok.lemma_ or tok.text).lower() for tok in doc
                      if tok.is_alpha and not tok.is_stop and not tok.is_punct)
            out.append([w for w in lemmas if w.isalpha()])
        return out

    return tokenize, how


@dataclass
class SpamData:
    X_train: np.ndarray
    y_train: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray
    vocabulary: list
    info: dict


def tokenized_emails(data_dir=None, cache_dir: str | Path | None = None) -> tuple[list[list[str]], np.ndarray, str]:
    """(token lists, labels, tokenizer description) of every email, sorted by name.

    Tokenising the corpus takes about a minute; with ``cache_dir`` the tokens are cached
    (npz, atomic; keyed by the archive's hash and the tokenizer) so that each further
    train/test split costs only the vectoriser.
    """
    root = resolve_data_dir(data_dir)
    path = root / "spam" / "enron1.tar.gz"
    cached = None
    if cache_dir is not None and path.is_file():
        key = hash_arrays(sha256_file(path), {"tokens": 1})
        cached = Path(cache_dir) / f"enron1-tokens-{key[:20]}.npz"
        if cached.is_file():
            try:
                with np.load(cached, allow_pickle=False) as f:
                    return [str(t).split() for t in f["tokens"]], f["labels"], str(f["how"])
            except Exception as exc:
                logger.warning("ignoring unreadable cache %s (%s)", cached, exc)
    texts, labels, _ = read_emails(root)
    tokenize, how = make_tokenizer()
    tokens = tokenize(texts)
    if cached is not None:  # tokens are alphabetic, so a space joins them losslessly
        save_npz(cached, tokens=np.array([" ".join(t) for t in tokens]), labels=labels, how=np.array(how))
    return tokens, labels, how


def load_spam(data_dir=None, seed: int = 0, min_df: int = 5, n_train: int = N_TRAIN,
              cache_dir: str | Path | None = None) -> SpamData:
    """Bag-of-words train/test matrices (float64 counts) and labels (1 = spam).

    ``seed`` draws the train/test split (the vocabulary is fitted on its training part).
    """
    from sklearn.feature_extraction.text import CountVectorizer

    root = resolve_data_dir(data_dir)
    path = root / "spam" / "enron1.tar.gz"
    key = None
    if cache_dir is not None and path.is_file():
        key = hash_arrays(sha256_file(path), {"seed": seed, "min_df": min_df, "n_train": n_train, "v": 2})
        cached = Path(cache_dir) / f"spam-{key[:20]}.npz"
        if cached.is_file():
            try:
                with np.load(cached, allow_pickle=False) as f:
                    return SpamData(f["X_train"], f["y_train"], f["X_test"], f["y_test"], f["vocabulary"].tolist(),
                                    json.loads(str(f["info"])))
            except Exception as exc:
                logger.warning("ignoring unreadable cache %s (%s)", cached, exc)
    tokens, labels, how = tokenized_emails(root, cache_dir)
    if n_train >= len(tokens):
        raise ValueError(f"n_train={n_train} leaves no test emails out of {len(tokens)}")
    perm = np.random.default_rng(seed).permutation(len(tokens))
    tr, te = perm[:n_train], perm[n_train:]
    vec = CountVectorizer(analyzer=lambda toks: toks, min_df=min_df)
    X_train = vec.fit_transform([tokens[i] for i in tr]).toarray().astype(np.float64)
    X_test = vec.transform([tokens[i] for i in te]).toarray().astype(np.float64)
    info = {"tokenizer": how, "n_emails": len(tokens), "n_spam": int(labels.sum()), "n_features": X_train.shape[1],
            "seed": seed, "min_df": min_df}
    data = SpamData(X_train, labels[tr], X_test, labels[te], vec.get_feature_names_out().tolist(), info)
    if key is not None:
        save_npz(Path(cache_dir) / f"spam-{key[:20]}.npz", X_train=X_train, y_train=data.y_train, X_test=X_test,
                 y_test=data.y_test, vocabulary=np.array(data.vocabulary), info=json.dumps(info))
    return data
