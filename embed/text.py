"""The one caption cleaner: every caption and prompt goes through `clean_caption` before T5 sees it.

Training captions (`kiln prepare`) and sampling prompts (`kiln embed-prompts`) must be encoded from
text cleaned the same way, or the model meets a distribution at sampling time that it never saw in
training. So there is exactly one function, and `embed.t5.T5Embedder` calls it itself.

What it does, in order (each step says why):

1. `html.unescape`, repeated while it changes the text, at most 3 times -- alt-text is often escaped
   twice or three times ("&amp;amp;" -> "&", "caf&amp;eacute;" -> "café"). The cap bounds the work
   on a caption that *talks about* entities. This runs first so that step 2 also sees characters
   that arrived as entities (entity-encoded mojibake, "&#8220;" curly quotes).
2. `ftfy.fix_text` (with its own HTML unescaping off: step 1 is the only one) -- undoes mojibake
   ("cafÃ©" -> "café", "doesnÃ¢â‚¬â„¢t" -> "doesn't"), common in scraped alt-text; also
   NFC-normalises, straightens curly quotes, folds full-width letters and Latin ligatures
   ("ﬁ" -> "fi") and drops control characters.
3. HTML tags are removed only when they are unmistakably markup: an opening, closing or self-closing
   tag of a short fixed list of formatting tags (b, i, u, em, strong, small, big, sub, sup, span,
   font, a, br, p, div), e.g. "<b>bold</b>" -> "bold", '<a href="x">link</a>' -> "link".
   Line-breaking tags (br, p, div) become a space, inline ones nothing. Anything else containing
   "<" or ">" is left alone ("<3 you", "a < b > c", "<my tag>"): a general tag stripper would eat
   real caption text.
4. Invisible characters are deleted: zero-width space/non-joiner/joiner, word joiner, BOM and soft
   hyphen (they split T5 pieces without being seen).
5. Whitespace is normalised: every run of Unicode whitespace (spaces, tabs, newlines, NBSP, the
   U+2000 block, ideographic space, ...) becomes one ASCII space, and the ends are stripped.

Nothing else is changed: case, punctuation, URLs and emoji stay (T5's tokenizer handles case and
maps unknown characters to <unk>). Cleaning twice gives the same text as cleaning once (for
anything escaped at most three times).
"""

from __future__ import annotations

import html
import re

import ftfy

__all__ = ["clean_caption"]

_MAX_UNESCAPE = 3
# Formatting tags only; attributes allowed on opening tags, no nested "<" or ">" inside a tag.
_BLOCK_TAGS = "br|p|div"
_INLINE_TAGS = "b|i|u|em|strong|small|big|sub|sup|span|font|a"
_BLOCK_TAG_RE = re.compile(rf"</?(?:{_BLOCK_TAGS})(?:\s[^<>]*)?/?>", re.IGNORECASE)
_INLINE_TAG_RE = re.compile(rf"</?(?:{_INLINE_TAGS})(?:\s[^<>]*)?/?>", re.IGNORECASE)
# ZWSP, ZWNJ, ZWJ, word joiner, BOM / zero-width no-break space, soft hyphen
_INVISIBLE_RE = re.compile("[\u200b\u200c\u200d\u2060\ufeff\u00ad]")


def clean_caption(text: str) -> str:
    """Return `text` fixed and normalised for the text encoder (see the module docstring)."""
    if not isinstance(text, str):
        raise TypeError(f"caption must be a str, got {type(text).__name__}")
    for _ in range(_MAX_UNESCAPE):
        unescaped = html.unescape(text)
        if unescaped == text:
            break
        text = unescaped
    text = ftfy.fix_text(text, unescape_html=False)
    text = _BLOCK_TAG_RE.sub(" ", text)
    text = _INLINE_TAG_RE.sub("", text)
    text = _INVISIBLE_RE.sub("", text)
    return " ".join(text.split())
