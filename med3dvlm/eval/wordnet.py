"""WordNet 3.0 for METEOR without a download: NLTK's reader over Debian's WordNet files.

NLTK's METEOR matches synonyms through WordNet, which ``nltk.download("wordnet")`` would fetch from
the network. Debian's ``wordnet-base`` and ``wordnet-sense-index`` packages install the same
WordNet 3.0 database under ``/usr/share/wordnet``; NLTK reads it from a ``corpora/wordnet/``
folder once a ``lexnames`` file (which Debian leaves out) is added. ``python -m
med3dvlm.eval.wordnet`` builds that folder (copies of the Debian files, 37 MB, plus ``lexnames``)
where NLTK looks by default, and ``load_wordnet()`` returns the reader or says how to get it.
Copies, not symlinks: NLTK refuses to open a corpus file whose real path leaves the corpus root.
"""
from __future__ import annotations

import functools
import os
import shutil
import sys
import warnings
from pathlib import Path

__all__ = ["INSTALL_HINT", "WordNetUnavailable", "build_wordnet_folder", "load_wordnet"]

INSTALL_HINT = ("apt-get install wordnet-base wordnet-sense-index, then "
                "python -m med3dvlm.eval.wordnet")
DEBIAN_WORDNET_DIR = Path("/usr/share/wordnet")
# The database files NLTK's WordNetCorpusReader opens; lexnames is written by build_wordnet_folder.
DATABASE_FILES = (
    "cntlist.rev", "index.sense",
    "index.adj", "index.adv", "index.noun", "index.verb",
    "data.adj", "data.adv", "data.noun", "data.verb",
    "adj.exc", "adv.exc", "noun.exc", "verb.exc",
)
# The 45 lexicographer files of WordNet 3.0, numbered 00-44 in this order (lexnames(5WN)).
LEXNAMES = (
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact",
    "noun.attribute", "noun.body", "noun.cognition", "noun.communication", "noun.event",
    "noun.feeling", "noun.food", "noun.group", "noun.location", "noun.motive", "noun.object",
    "noun.person", "noun.phenomenon", "noun.plant", "noun.possession", "noun.process",
    "noun.quantity", "noun.relation", "noun.shape", "noun.state", "noun.substance", "noun.time",
    "verb.body", "verb.change", "verb.cognition", "verb.communication", "verb.competition",
    "verb.consumption", "verb.contact", "verb.creation", "verb.emotion", "verb.motion",
    "verb.perception", "verb.possession", "verb.social", "verb.stative", "verb.weather",
    "adj.ppl",
)
# lexnames(5WN)'s third column: the syntactic category of the file's synsets.
SYNTACTIC_CATEGORY = {"noun": 1, "verb": 2, "adj": 3, "adv": 4}


class WordNetUnavailable(LookupError):
    """WordNet 3.0 is not installed where NLTK can read it."""


def lexnames_text() -> str:
    """The ``lexnames`` file: number, name and syntactic category, tab-separated, one per line."""
    return "".join(f"{number:02d}\t{name}\t{SYNTACTIC_CATEGORY[name.split('.')[0]]}\n"
                   for number, name in enumerate(LEXNAMES))


def source_dir() -> Path:
    """Where the WordNet database files are: ``$WNSEARCHDIR`` (WordNet's own variable) or Debian's."""
    return Path(os.environ.get("WNSEARCHDIR") or DEBIAN_WORDNET_DIR)


def default_nltk_data() -> Path:
    """``<sys.prefix>/nltk_data`` (on NLTK's default search path) if writable, else ``~/nltk_data``."""
    prefix_data = Path(sys.prefix) / "nltk_data"
    writable = prefix_data if prefix_data.exists() else Path(sys.prefix)
    return prefix_data if os.access(writable, os.W_OK) else Path.home() / "nltk_data"


def build_wordnet_folder(source: Path | None = None, nltk_data: Path | None = None) -> Path:
    """Make ``<nltk_data>/corpora/wordnet/`` from the WordNet files in ``source``; idempotent.

    Database files are copied (again only when size or modification time differ) and ``lexnames``
    is written. Returns the folder.
    """
    source = Path(source) if source is not None else source_dir()
    missing = [name for name in DATABASE_FILES if not (source / name).is_file()]
    if missing:
        raise WordNetUnavailable(f"WordNet database files missing from {source}: "
                                 f"{', '.join(missing)}. Install them: {INSTALL_HINT}")
    folder = Path(nltk_data or default_nltk_data()) / "corpora" / "wordnet"
    folder.mkdir(parents=True, exist_ok=True)
    for name in DATABASE_FILES:
        original, copy = (source / name).stat(), folder / name
        if (copy.is_file() and copy.stat().st_size == original.st_size
                and copy.stat().st_mtime == original.st_mtime):
            continue
        shutil.copy2(source / name, copy)
    lexnames = folder / "lexnames"
    if not lexnames.is_file() or lexnames.read_text() != lexnames_text():
        lexnames.write_text(lexnames_text())
    return folder


@functools.lru_cache(maxsize=1)
def load_wordnet():
    """NLTK's WordNet reader over the first ``corpora/wordnet`` on ``nltk.data.path``.

    Raises WordNetUnavailable, saying how to install it, when there is none or it cannot be read.
    """
    import nltk
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    try:
        root = nltk.data.find("corpora/wordnet")
    except LookupError:
        raise WordNetUnavailable(
            f"WordNet is not on NLTK's search path ({', '.join(nltk.data.path)}). Install it: "
            f"{INSTALL_HINT}") from None
    try:
        with warnings.catch_warnings():
            # Only the English WordNet is used, so the multilingual (OMW) data is not needed.
            warnings.filterwarnings("ignore", message="The multilingual functions")
            return WordNetCorpusReader(root, omw_reader=None)
    except OSError as error:  # e.g. a folder missing files
        raise WordNetUnavailable(f"WordNet at {root} cannot be read ({error}). "
                                 f"Reinstall it: {INSTALL_HINT}") from error


def main() -> int:
    try:
        folder = build_wordnet_folder()
        version = load_wordnet().get_version()
    except WordNetUnavailable as error:
        print(f"METEOR will be unavailable: {error}", file=sys.stderr)
        return 1
    print(f"WordNet {version} for NLTK: {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
