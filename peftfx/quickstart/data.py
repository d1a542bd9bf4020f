"""An offline text-classification task built from the Python standard library that ships with every Python:
the first paragraph of the docstring of each public function, class and method, labelled by the family of the
module it comes from (text processing, numbers, files, networking, concurrency). Used by ``peftfx quickstart``.

The split is by a hash of the text, so it is the same on every run and machine with the same Python version.
"""
from __future__ import annotations

import hashlib
import importlib
import inspect
import random
import re
import warnings

__all__ = ["FAMILIES", "docstring_dataset"]

FAMILIES: dict[str, tuple[str, ...]] = {
    "text": ("string", "re", "textwrap", "difflib", "unicodedata", "codecs", "html", "html.parser", "stringprep",
             "shlex", "locale", "gettext"),
    "numbers": ("math", "cmath", "decimal", "fractions", "random", "statistics", "numbers", "operator", "bisect",
                "heapq"),
    "files": ("os", "posixpath", "pathlib", "shutil", "glob", "fnmatch", "tempfile", "filecmp", "stat", "zipfile",
              "tarfile", "gzip", "bz2", "lzma", "fileinput"),
    "network": ("http.client", "http.server", "http.cookies", "urllib.request", "urllib.parse", "smtplib", "socket",
                "ssl", "ftplib", "imaplib", "poplib", "xmlrpc.client", "email.message", "email.utils"),
    "concurrency": ("threading", "multiprocessing.pool", "multiprocessing.connection", "concurrent.futures",
                    "asyncio.tasks", "asyncio.queues", "asyncio.locks", "asyncio.events", "queue", "sched",
                    "subprocess", "selectors"),
}


def _first_paragraph(doc: str | None) -> str | None:
    if not doc:
        return None
    text = inspect.cleandoc(doc).split("\n\n", 1)[0]
    text = re.sub(r"\s+", " ", text).strip()
    if len(text) < 25 or text.startswith(("Return self", "Implement ", "Initialize self", "See help(")):
        return None
    return text


def _docstrings(module_name: str) -> list[str]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            return []
    out = []
    for name, obj in inspect.getmembers(module):
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        if not (inspect.isfunction(obj) or inspect.isclass(obj) or inspect.isbuiltin(obj)):
            continue
        out.append(_first_paragraph(inspect.getdoc(obj)))
        if inspect.isclass(obj):
            for mname, member in vars(obj).items():
                if not mname.startswith("_") and callable(member):
                    out.append(_first_paragraph(getattr(member, "__doc__", None)))
    return [t for t in out if t]


def docstring_dataset(train_per_class: int = 80, test_per_class: int = 40,
                      seed: int = 0) -> tuple[list[tuple[str, int]], list[tuple[str, int]], list[str]]:
    """(train, test, label names): ``(text, label)`` pairs, classes balanced, texts unique across both splits."""
    labels = list(FAMILIES)
    seen: set[str] = set()
    train, test = [], []
    for label, family in enumerate(labels):
        texts = []
        for module_name in FAMILIES[family]:
            for t in _docstrings(module_name):
                if t not in seen:
                    seen.add(t)
                    texts.append(t)
        held = [t for t in texts if int(hashlib.sha256(t.encode()).hexdigest(), 16) % 3 == 0]
        kept = [t for t in texts if t not in set(held)]
        rng = random.Random(seed * 1000 + label)
        rng.shuffle(kept)
        rng.shuffle(held)
        train += [(t, label) for t in kept[:train_per_class]]
        test += [(t, label) for t in held[:test_per_class]]
    random.Random(seed).shuffle(train)
    return train, test, labels
