"""METEOR 1.5, ROUGE-L and CIDEr-D exactly as the E2E NLG scripts compute them: the MS-COCO caption scorers.

tuetschek/e2e-metrics runs coco-caption's `COCOEvalCap`: Stanford CoreNLP's PTBTokenizer (Java, lowercased,
punctuation tokens dropped) on the predictions and on every reference (duplicates kept), then METEOR 1.5 (Java,
`-l en -norm`, one corpus score from the pooled statistics), ROUGE-L (best LCS precision and best LCS recall over
the references, F with beta 1.2, averaged over segments) and CIDEr-D (TF-IDF n-grams 1-4 with document
frequencies over the evaluated corpus's references, Gaussian length penalty sigma 6, x10). The PyPI package
`pycocoevalcap` 1.2 carries the same code and the same jar files (byte-identical to the ones e2e-metrics ships),
so it is called here rather than re-implemented. SPICE is not used (it would download Stanford CoreNLP models).

Without a Java runtime the tokeniser and METEOR cannot run. `approximate_scores` then gives pure-Python stand-ins
under *other* names (`rouge_l_13a`, `cider_13a`: the same ROUGE-L/CIDEr-D code on lowercased 13a tokens without
punctuation tokens; METEOR falls back to nltk, see `metrics.meteor_nltk`): close, but not the published metric.
"""

from __future__ import annotations

import atexit
import contextlib
import locale
import logging
import os
import re
import shutil
import sys
import threading
from collections.abc import Iterator, Sequence

from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from lorasens.metrics.mteval import tokenize as mteval_tokenize

logger = logging.getLogger(__name__)

# Characters Java's line reader treats as line ends: inside one caption they would shift every later line of the
# tokeniser's output onto the wrong caption, so they become spaces first.
_LINE_BREAKS = re.compile("[\r\n\x0b\x0c\x85\u2028\u2029]")
# What the PTB tokeniser wrapper drops (pycocoevalcap.tokenizer.ptbtokenizer.PUNCTUATIONS) plus the other ASCII
# punctuation tokens 13a produces; used by the pure-Python approximations only.
_PUNCT_TOKENS = frozenset(list("''`.?!,:-;\"()[]{}") + ["--", "...", "``"])
NO_JAVA = ("no Java runtime (java not on PATH): METEOR 1.5 and the PTB tokeniser cannot run, so meteor_nltk, "
           "rouge_l_13a and cider_13a are pure-Python approximations, not comparable with published METEOR / ROUGE-L "
           "/ CIDEr (install a JRE, e.g. Debian default-jre-headless, which `make setup` does)")


def java_available() -> bool:
    return shutil.which("java") is not None


@contextlib.contextmanager
def _java_utf8() -> Iterator[None]:
    """Make the JVMs read and write UTF-8 ("£", "é") under a non-UTF-8 locale, where Java 17 would fall back to ASCII."""
    if locale.getpreferredencoding(False).replace("-", "").lower() == "utf8":
        yield
        return
    old = os.environ.get("JAVA_TOOL_OPTIONS")
    os.environ["JAVA_TOOL_OPTIONS"] = ((old + " ") if old else "") + "-Dfile.encoding=UTF-8"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("JAVA_TOOL_OPTIONS", None)
        else:
            os.environ["JAVA_TOOL_OPTIONS"] = old


_METEOR: Meteor | None = None
_METEOR_LOCK = threading.Lock()


def _meteor() -> Meteor:
    """The METEOR 1.5 process, started on first use and kept: loading its paraphrase table takes 5-30 s, so the
    lora and baseline scores of a run, or the runs of a sweep, share one process. `close_meteor` (also run at
    exit) stops it; pycocoevalcap itself only stops it in `__del__`."""
    global _METEOR
    with _METEOR_LOCK:
        if _METEOR is None or _METEOR.meteor_p.poll() is not None:
            with _java_utf8():
                _METEOR = Meteor()
        return _METEOR


def close_meteor() -> None:
    """Stop the METEOR process, if one runs (closes its pipes, kills it and reaps it)."""
    global _METEOR
    with _METEOR_LOCK:
        scorer, _METEOR = _METEOR, None
    if scorer is None:
        return
    process = scorer.meteor_p
    for stream in (process.stdin, process.stdout, process.stderr):
        stream.close()
    process.kill()
    process.wait()
    scorer.meteor_p = _Stopped()  # `Meteor.__del__` closes and kills again: give it a no-op


atexit.register(close_meteor)


class _Stopped:
    """Stands in for the finished METEOR process so that pycocoevalcap's `__del__` has nothing left to stop."""

    class _Stream:
        def close(self) -> None:
            pass

    stdin = _Stream()

    def kill(self) -> None:
        pass

    def wait(self) -> None:
        pass


@contextlib.contextmanager
def _java_stderr_to_log(what: str):
    """The Java tool's stderr (e.g. `PTBLexer ... Untokenizable` lines) goes to the debug log (run.log), not the
    terminal: file descriptor 2 is pointed at a temporary file while it runs."""
    import tempfile

    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            for line in capture.read().decode("utf-8", "replace").splitlines():
                logger.debug("%s: %s", what, line)


def ptb_tokenize(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> tuple[dict, dict]:
    """({i: [prediction tokens]}, {i: [reference tokens, ...]}) from one run of the PTB tokeniser."""
    captions = {("h", i): [{"caption": _LINE_BREAKS.sub(" ", p)}] for i, p in enumerate(predictions)}
    captions.update({("r", i): [{"caption": _LINE_BREAKS.sub(" ", r)} for r in rs] for i, rs in enumerate(references)})
    with _java_utf8(), _java_stderr_to_log("PTB tokeniser"):
        tokens = PTBTokenizer().tokenize(captions)
    expected = len(predictions) + sum(len(rs) for rs in references)
    if sum(len(v) for v in tokens.values()) != expected:
        raise RuntimeError(f"PTB tokeniser returned {sum(len(v) for v in tokens.values())} lines for {expected} texts")
    hyps = {i: tokens[("h", i)] for i in range(len(predictions))}
    refs = {i: tokens[("r", i)] for i in range(len(references))}
    return hyps, refs


def official_scores(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """meteor (0-100), rouge_l (0-100), cider: the e2e-metrics / coco-caption values. Needs Java."""
    hyps, refs = ptb_tokenize(predictions, references)
    meteor_score, _ = _meteor().compute_score(refs, hyps)
    rouge_score, _ = Rouge().compute_score(refs, hyps)
    cider_score, _ = Cider().compute_score(refs, hyps)
    return {"meteor": 100.0 * float(meteor_score), "rouge_l": 100.0 * float(rouge_score), "cider": float(cider_score)}


def simple_tokens(text: str) -> str:
    """Lowercased 13a tokens without punctuation tokens: the pure-Python stand-in for the PTB tokeniser."""
    return " ".join(t for t in mteval_tokenize(text.lower()) if t not in _PUNCT_TOKENS)


def approximate_scores(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """rouge_l_13a (0-100) and cider_13a: coco-caption's ROUGE-L and CIDEr-D code on `simple_tokens`."""
    hyps = {i: [simple_tokens(p)] for i, p in enumerate(predictions)}
    refs = {i: [simple_tokens(r) for r in rs] for i, rs in enumerate(references)}
    rouge_score, _ = Rouge().compute_score(refs, hyps)
    cider_score, _ = Cider().compute_score(refs, hyps)
    return {"rouge_l_13a": 100.0 * float(rouge_score), "cider_13a": float(cider_score)}
