"""Reading a message's header section: linear in its input, bounded in what it keeps.

Every part of pyqmail that looks into message data goes through this module, so there is
one place where the rules below hold (a test, ``tests/unit/test_linear_parsers.py``, times
each parser at N and 2N bytes of pathological input):

- **Hops** (RFC 5321 §6.3). A hop is a ``Received:`` or ``Delivered-To:`` line in the header
  section, as qmail counts them (qmail-smtpd's ``MAXHOPS``; ``Delivered-To`` is the line each
  qmail-style local delivery adds, so a loop through ``.qmail`` forwards counts too).
  ``HopCounter`` counts them while DATA streams in, in constant memory, over the whole header
  section however long it is; pyqmail-smtpd refuses a message with more than ``maxhops``
  (``554 5.4.6``) and queues nothing.
- **Fields**: ``raw_fields`` is the one reading of a header section into whole fields (each
  with its continuation lines) and of a line that is no field: DKIM signing, the scanning
  stage's header edits and ``header_fields`` all split by it; ``head_and_rest`` is where a
  CRLF message's header section ends.
- **Header size** (Postfix's ``header_size_limit``, same default: ``HEADER_SIZE_LIMIT``,
  100 KiB). Parsers that build values out of header fields (local delivery's loop checks, the
  header copy in a bounce, the queue tool's header view, ``pyqmail-sendmail -t``) look at the
  first ``HEADER_SIZE_LIMIT`` bytes only. Nothing is cut from the message itself: it is
  stored, delivered and relayed unchanged; only what pyqmail reads out of it is bounded.
- **Address fields**: ``mailbox_addresses`` reads the addresses of a From field (for the
  sender rules of ``pyqmail.smtpd.senders``) with one tokenizing regex pass and a counter for
  nested comments, never the standard library's recursive, super-linear parser; what it
  cannot read unambiguously is None (refused), never guessed. For DMARC, a From it cannot
  read is still judged on what a reader may see in it: ``shown_domains`` finds the domain
  after every at sign (in comments, quoted strings and encoded words too, adjacent encoded
  words joined as clients join them, the encoded words of a lenient client's pattern too),
  bounded by ``SHOWN_LIMIT`` characters.
- Unfolding joins the pieces of a field once (``b" ".join``), never with repeated ``+=``
  (which copies the value again for every continuation line: quadratic).
"""

from __future__ import annotations

import base64
import binascii
import itertools
import re
import unicodedata
from collections.abc import Iterator

HEADER_SIZE_LIMIT = 100 * 1024
DEFAULT_MAXHOPS = 100

# A hop line at the start of the header or after a line end (CRLF; the stream is normalized).
_HOP = re.compile(rb"\n(?:received|delivered-to)[ \t]*:", re.IGNORECASE)
_HOP_NAME = re.compile(rb"(\n(?:received|delivered-to))[ \t]+", re.IGNORECASE)
# A partial last line this short may still become a hop line or the header's end.
_CARRY = len(b"\ndelivered-to:")
_END = b"\n\r\n"  # a line end, then the empty line


class HopCounter:
    """Counts hop lines in a CRLF stream fed in arbitrary chunks; stops at the empty line.

    Cost: one C-speed regex scan per chunk plus a carried tail of at most ``_CARRY`` bytes
    (the partial last line, when it may still become a hop line), so a header of any shape
    (many short lines, one long line, folds) costs O(n) time and O(1) memory.
    """

    def __init__(self) -> None:
        self.hops = 0
        self.done = False
        self._tail = b"\n"  # the message starts at a line start

    def feed(self, chunk: bytes) -> None:
        """Count the hop lines ``chunk`` completes; ignore everything after the header."""
        if self.done or not chunk:
            return
        data = self._tail + chunk
        end = data.find(_END)
        self.hops += len(_HOP.findall(data if end < 0 else data[: end + 1]))
        if end >= 0:
            self.done = True
            self._tail = b""
            return
        partial = data[data.rfind(b"\n") :] if b"\n" in data else b""
        if _HOP.match(partial):  # counted already
            self._tail = b""
        elif len(partial) <= _CARRY:
            self._tail = partial
        elif name := _HOP_NAME.fullmatch(partial):  # "Received" + a long run of blanks
            self._tail = name.group(1) + b" "
        else:
            self._tail = b""


def header_section(message: bytes, limit: int = HEADER_SIZE_LIMIT) -> bytes:
    """The header section (without the empty line) of a CRLF or LF message, at most ``limit``
    bytes (cut at a line end when the section is longer)."""
    head = message[: limit + 4]
    for sep in (b"\r\n\r\n", b"\n\n"):
        end = head.find(sep)
        if 0 <= end <= limit:
            return head[:end]
    if message.startswith((b"\r\n", b"\n")):
        return b""
    if len(message) <= limit:
        return message
    cut = head.rfind(b"\n", 0, limit)
    if cut <= 0:
        return head[:limit]
    return head[: cut - 1 if head[cut - 1 : cut] == b"\r" else cut]


# One piece of a header section: a field's first line (a name, blanks, a colon) or any other
# line, then the continuation lines after it. Possessive quantifiers: no backtracking state
# is kept per line, and a name that is not followed by a colon is given up once.
_PIECE = re.compile(rb"(?=[\s\S])(?:([!-9;-~]++)[ \t]*+:)?+[^\n]*+(?:\n[ \t][^\n]*+)*+\n?")


def raw_fields(head: bytes) -> list[tuple[bytes, bytes]]:
    """Every piece of the header section ``head`` (CRLF or LF line ends), in order, as
    (name as written, the piece's bytes with its line ends); the pieces joined are ``head``.

    A piece is a line and the lines after it that start with a blank (continuation lines).
    Its name is the field name when the line is a field's first: printable characters but
    the colon, blanks allowed before the colon (RFC 5322 obs-field). Any other line (no
    colon, a blank inside the name, an empty name, a blank at the very start) is a stray
    line: a piece of its own named ``b""``, and the header section goes on after it. One
    rule for DKIM signing, the scanning stage's edits and ``header_fields``, because it is
    what the readers after us do:

    - rspamd 3.4 (``rspamadm mime dump``) skips a stray line and the continuation lines
      after it, and reads the fields after it; Dovecot 2.3 reads the fields after it too
      (IMAP SEARCH and FETCH of what local delivery stored). dkimpy skips a stray ``From ``
      line (mbox) and refuses a message with any other (``MessageFormatError``), OpenDKIM
      one with a line without a colon ("header malformed"). So a signature leaves a stray
      line out of every signed field (with an mbox ``From `` line it verifies with dkimpy),
      and ``pyqmail.scan.stage.strip_ours`` finds a forged field after one (a sender's
      ``X-Spam-Flag: NO``, then a stray line, then ``X-Spam: No``: both go).
    - Never a continuation of the field before it (what signing did): no reader joins it
      to that field, so a signature over the joined field failed at every verifier.
    - Never the end of the header section (Postfix ends it there, inserting an empty line,
      and so does Python's email package): the fields after it would escape ``strip_ours``
      while rspamd and Dovecot read them. The price: a signed message with a stray line
      fails at a verifier behind Postfix, whose body then starts at that line.

    One regex pass; each piece is one slice of ``head``, never built line by line (adding a
    field's lines one at a time copied it again for every continuation line: quadratic)."""
    return [(m.group(1) or b"", m.group()) for m in _PIECE.finditer(head)]


def head_and_rest(message: bytes) -> tuple[bytes, bytes]:
    """A CRLF message's header section with its last line's CRLF, and the rest: the empty
    line and the body after it; ``head + rest == message``. A message that starts with the
    empty line has no header section (``b""``, all of it is the rest: its first paragraph
    is body, never fields); one with no empty line is all header section (the rest
    ``b""``). Unbounded, unlike ``header_section``: for callers that rewrite the header
    section (``pyqmail.scan.stage``) or sign the body (``pyqmail.dkim.sign``, after the
    rest's first CRLF)."""
    if message.startswith(b"\r\n"):
        return b"", message
    end = message.find(b"\r\n\r\n")
    if end < 0:
        return message, b""
    return message[: end + 2], message[end + 2 :]


def header_fields(message: bytes, limit: int = HEADER_SIZE_LIMIT) -> list[tuple[str, bytes]]:
    """(lower-case name, unfolded raw value) of every field in the first ``limit`` bytes of
    the header section, in order; a stray line (``raw_fields``) and its continuation lines
    are no field and skipped. One pass of ``raw_fields``; each value is joined once."""
    out = []
    for name, field in raw_fields(header_section(message, limit)):
        if not name:
            continue
        value = field[field.index(b":", len(name)) + 1 :].rstrip(b"\r\n")
        if b"\n" in value:
            value = b" ".join(part.strip() for part in value.split(b"\n"))
        out.append((name.decode("ascii").lower(), value.strip()))
    return out


def header_values(message: bytes, name: str, limit: int = HEADER_SIZE_LIMIT) -> list[str]:
    """Unfolded values of every ``name:`` field (case-insensitive) within ``limit`` bytes."""
    want = name.lower()
    return [
        value.decode("utf-8", "replace")
        for field, value in header_fields(message, limit)
        if field == want
    ]


# --- the addresses of an address field (From) --------------------------------------------
# One regex pass over the field (possessive quantifiers: no backtracking), comments skipped by
# a counter (no recursion, whatever their nesting): linear where the standard library's
# email.headerregistry took 0.27 s for 1 KiB of "a a a ..." and recursed out on nested comments.

_ADDR_TOKEN = re.compile(
    r"""(?P<ws>[ \t\r\n]++)
    |(?P<qs>"(?:[^"\\]|\\.)*+")
    |(?P<lit>\[(?:[^\[\]\\]|\\.)*+\])
    |(?P<atom>[^\s()<>\[\]:;@\\,".]++)
    |(?P<special>[<>:;@,.])
    |(?P<comment>\()""",
    re.VERBOSE | re.DOTALL,
)
_WORDS = frozenset({"atom", "qs"})
Token = tuple[str, str]


def _skip_comment(value: str, pos: int) -> int | None:
    """The position after the comment that opens at ``pos``; None if it never closes."""
    depth, i, end = 0, pos, len(value)
    while i < end:
        c = value[i]
        if c == "\\":
            i += 2
            continue
        if c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return None


def _address_tokens(value: str) -> list[Token] | None:
    """The field's tokens without blanks and comments; None at anything unbalanced or stray."""
    tokens: list[Token] = []
    pos = 0
    while pos < len(value):
        match = _ADDR_TOKEN.match(value, pos)
        if match is None:
            return None
        kind = match.lastgroup or ""
        if kind == "comment":
            after = _skip_comment(value, pos)
            if after is None:
                return None
            pos = after
            continue
        if kind != "ws":
            tokens.append((kind, match.group()))
        pos = match.end()
    return tokens


def _addr_spec(tokens: list[Token]) -> str | None:
    """local@domain from its tokens (a quoted local part unquoted), or None, also when two
    words stand in a row in either part: the domain's were joined across the blank, so
    ``ceo@paypal.com x`` was ``ceo@paypal.comx`` (no DMARC record there), where Python's
    email and mail clients read ceo@paypal.com; DMARC then judges what is shown."""
    texts = [text for _, text in tokens]
    if texts.count("@") != 1:
        return None
    at = texts.index("@")
    local, domain = tokens[:at], tokens[at + 1 :]
    parts: list[str] = []
    for i, (kind, text) in enumerate(local):
        dotted = kind == "special" and text == "."
        if not dotted and kind not in _WORDS:
            return None
        if i and (dotted == (local[i - 1][1] == ".")):
            return None  # two words, or two dots, in a row
        parts.append(re.sub(r"\\(.)", r"\1", text[1:-1]) if kind == "qs" else text)
    if len(domain) == 1 and domain[0][0] == "lit":
        host = domain[0][1]
    elif all(k == "atom" or t == "." for k, t in domain) and domain:
        if any(a[0] == b[0] == "atom" for a, b in itertools.pairwise(domain)):
            return None  # two words in a row: "ceo@paypal.com x" is no "ceo@paypal.comx"
        host = "".join(t for _, t in domain)
    else:
        return None
    if not parts or not host.strip(".") or ".." in host:
        return None
    return "".join(parts) + "@" + host


def _mailbox(tokens: list[Token]) -> str | None:
    """``display-name <addr-spec>`` or a bare addr-spec; None when it is anything else (an
    address-like display name, a source route, a second angle address)."""
    texts = [text for kind, text in tokens if kind == "special"]
    if "<" not in texts:
        return _addr_spec(tokens)
    if texts.count("<") != 1 or texts.count(">") != 1 or tokens[-1] != ("special", ">"):
        return None
    start = tokens.index(("special", "<"))
    if any(k not in _WORDS and t != "." for k, t in tokens[:start]):
        return None  # a display name is words (and the dots of obsolete syntax) only
    return _addr_spec(tokens[start + 1 : -1])


def mailbox_addresses(value: str) -> list[str] | None:
    """The addresses of an address-list field value (RFC 5322 3.4: mailboxes and groups), in
    order; None when any part cannot be read unambiguously. Linear in ``len(value)``."""
    tokens = _address_tokens(value)
    if tokens is None:
        return None
    out: list[str] = []
    current: list[Token] = []
    group = angle = False
    for token in [*tokens, ("special", ",")]:
        text = token[1] if token[0] == "special" else ""
        angle = (angle or text == "<") and text != ">"
        if text == ":" and not angle and not group:
            if any(k not in _WORDS and t != "." for k, t in current) or not current:
                return None
            group, current = True, []
        elif text in (",", ";") and not angle:
            if text == ";" and not group:
                return None
            if current:
                address = _mailbox(current)
                if address is None:
                    return None
                out.append(address)
            current = []
            group = group and text != ";"
        else:
            current.append(token)
    return None if group or angle or current else out


# --- the domains a reader may be shown in a From field nobody can parse ------------------
# What a mail client shows of a From the grammar above refuses (``user@example.com
# <user@example.com>``, ``taro..yamada@docomo.ne.jp``) is its guess; DMARC judges every domain
# such a guess could show, so no reading of the field escapes the strictest policy among them.

SHOWN_LIMIT = 4096  # characters of an unreadable From read for its domains; longer: refused
_ENCODED_WORD = re.compile(r"=\?([^?\s]{1,75})\?([QqBb])\?([^?\s]*+)\?=")
# The start of an encoded word as Roundcube (rcube_mime::decode_mime_string) finds it, with
# =\?([^?]+)\?([BbQq])\?([^\n]*?)\?=; its payload is found by ``_lenient_words``.
_LENIENT = re.compile(r"=\?([^?\n]++)\?([BbQq])\?")
_NOT_BASE64 = re.compile(r"[^A-Za-z0-9+/]++")
Word = tuple[int, int, str, str, str]  # an encoded word: start, end, charset, encoding, payload
Shown = tuple[str, str]  # what it shows: as its charset decodes it, as Latin-1
_PRINTABLE = bytes(range(0x20, 0x7F))  # what an address is written in
_DOMAIN = r"[^\s<>()\[\]\",;:@\\]*+"  # what a domain shown after an at sign may hold
# After an at sign: blanks and (unnested) comments, RFC 5322 4.4's CFWS around "@", then the
# domain (a quoted string's first word counts: a client shows it without its quotes).
_AFTER_AT = re.compile(rf"(?P<cfws>(?:\s++|\((?:[^()\\]|\\.)*+\))*+)\"?\s*+(?P<domain>{_DOMAIN})")
_COMMENT_WORD = re.compile(rf"\(\s*+\"?\s*+({_DOMAIN})")  # ceo@(bank.example)evil.example
# A host name in a word shown after an at sign ends at an ASCII character no host name holds
# (all but letters, digits, "-", "." and "_"), as a reader takes "Yahoo!" in "News @ Yahoo!
# <...>" for yahoo and "bank.test?=" for bank.test. Other characters are left to IDNA
# (U+00B7 is in Catalan names, U+3002 is a dot to it).
_HOST_RUN = re.compile(r"[^!-,/:-@\[-^`{-~]++")
_HIDDEN = frozenset({"Cc", "Co", "Cs", "Zl", "Zp"})  # controls, private use, line breaks
# Bidirectional embeddings, overrides and isolates: they reorder what is shown, so a client
# may show 'ceo@bank.example' for the bytes 'elpmaxe.knab@oec'. Other format characters
# (U+200D zero-width joiner, U+200F right-to-left mark) are harmless in a display name; in a
# domain they are refused (what is looked up would not be what a reader sees).
_BIDI = re.compile("[\u202a-\u202e\u2066-\u2069]")


def _b64(payload: str) -> bytes | None:
    """A B payload's bytes as Python's email package decodes it: characters outside the
    base64 alphabet dropped (``Y2VvQGJhbmsudGVzdA!`` is ceo@bank.test), nothing after the
    padding, missing padding added; None when its length cannot be base64 (shown as
    written)."""
    data = _NOT_BASE64.sub("", payload.partition("=")[0])
    if len(data) % 4 == 1:
        return None
    return base64.b64decode(data + "=" * (-len(data) % 4))


def _payload_bytes(kind: str, payloads: list[str]) -> bytes | None:
    """The bytes of the payloads of one encoded word, or of adjacent words of one charset
    and encoding joined before decoding, as Roundcube joins them (``rcube_mime``: a
    character split across words, ``=?utf-8?q?ceo=4?= =?utf-8?q?0bank.test?=`` shows
    ceo@bank.test): Q payloads concatenated, B payloads cut into 4-character quanta across
    the words, each piece decoded as ``_b64`` (a padded word ends its quanta)."""
    if kind in "Qq":
        return binascii.a2b_qp("".join(payloads).encode(), header=True)
    if len(payloads) == 1:
        return _b64(payloads[0])
    out, rest = [], ""
    for payload in payloads:
        chunk = rest + payload
        cut = len(chunk) - len(chunk) % 4
        out.append(_b64(chunk[:cut]) or b"")
        rest = chunk[cut:]
    out.append(_b64(rest) or b"")
    return b"".join(out)


def _decoded(charset: str, kind: str, payloads: list[str]) -> tuple[str, str] | None:
    """RFC 2047 encoded words as a mail client shows them: (as its charset decodes them, as
    a client that does not know that charset may show them); None when they do not decode
    (a client shows them as written). A charset Python does not know or cannot decode such
    bytes with (``idna``, ``punycode``, ``undefined``) is read as Latin-1: every byte shown,
    an at sign as itself. A charset that shows printable ASCII bytes as something else
    (``utf-16``, ``utf-32``, EBCDIC's ``cp500``, ``utf-7``, ``hz``) has a second reading, its
    bytes as Latin-1: a client that does not know it may show ``ceo@bank.example`` for what
    UTF-32 decodes to four replacement characters. Only those: the ASCII-compatible charsets
    every client knows (``iso-2022-jp``, ``shift_jis``, ``big5``) put an at sign byte inside
    most Japanese or Chinese names (0x40 is half of many characters: 太 is ``B@`` in
    ISO-2022-JP), so their Latin-1 reading would judge, or refuse, what no reader sees."""
    try:
        raw = _payload_bytes(kind, payloads)
    except (binascii.Error, ValueError):
        return None
    if raw is None:
        return None
    latin = raw.decode("latin-1")
    name = charset.partition("*")[0]  # RFC 2231's language after the charset
    try:
        shown = raw.decode(name, "replace")
        ascii_shown = _PRINTABLE.decode(name, "replace") == _PRINTABLE.decode("ascii")
    except (LookupError, UnicodeError, ValueError):  # the idna codec takes no "replace"
        return latin, latin
    return shown, shown if ascii_shown else latin


def _lenient_words(value: str) -> Iterator[Word]:
    """The encoded words Roundcube's pattern finds (``_LENIENT``): blanks and question marks
    in the payload (``=?utf-8?q?ceo=40bank.test ?=``, Python's email decodes it too), a
    charset of any length (an RFC 2231 language of 80 characters). Its lazy payload, up to
    the first ``?=`` on the line, is found with ``str.find`` from positions that only move
    forward (the regex engine would rescan the rest of the line from every ``=?`` that
    never closes: quadratic), so the whole pass is linear in ``len(value)``."""
    pos = close = newline = 0
    while (m := _LENIENT.search(value, pos)) is not None:
        if close < m.end():
            close = value.find("?=", m.end())
            if close < 0:
                return  # no word after this one can close either
        if newline < m.end():
            newline = value.find("\n", m.end())
            newline = len(value) if newline < 0 else newline
        if newline < close:
            pos = newline + 1  # every word starting before it closes after it: none does
            continue
        yield m.start(), close + 2, m.group(1), m.group(2), value[m.end() : close]
        pos = close + 2


def _decoded_words(value: str, words: list[Word], join: bool) -> list[tuple[int, int, Shown]]:
    """(start, end, ``_decoded``) of each word that decodes, in order; with ``join``, each
    run of adjacent words (only blanks between) of one charset and encoding is decoded as
    one word (``_payload_bytes``). Roundcube compares charset and encoding as written; they
    are compared here ignoring case, one more reading of what some client may do."""
    out: list[tuple[int, int, Shown]] = []
    run: list[Word] = []
    for word in [*words, None]:
        if word and run and join:
            last = run[-1]
            gap = value[last[1] : word[0]]
            same = (last[2].lower(), last[3].lower()) == (word[2].lower(), word[3].lower())
            if same and (not gap or gap.isspace()):
                run.append(word)
                continue
        if run:
            shown = _decoded(run[0][2], run[0][3], [w[4] for w in run])
            if shown is not None:
                out.append((run[0][0], run[-1][1], shown))
        run = [word] if word else []
    return out


def _shown_texts(value: str) -> list[str]:
    """The readings of ``value`` a client may show, distinct, the raw value first: each
    encoded word replaced in place by what it shows (``_decoded``: its charset's decoding,
    and its bytes as Latin-1), with and without the blanks between adjacent encoded words.
    RFC 2047 6.2 drops them (Python's email.header and mail clients do: ``=?utf-8?q?ceo=40
    ban?= =?utf-8?q?k.test?=`` shows ``ceo@bank.test``); a client that does not, shows the
    blank (``=?utf-8?q?ceo=40bank.test?= =?utf-8?q?x?=``: ``ceo@bank.test x``). The words are
    those of RFC 2047's pattern and those of Roundcube's more lenient one
    (``_lenient_words``), each decoded alone and, as Roundcube does, adjacent ones of one
    charset and encoding joined before decoding. A word that does not decode is shown as
    written, and is no encoded word next to another. One pass per reading; each reading is
    at most as long as ``value`` (no word decodes to more characters than it has), so all
    are linear in ``len(value)``."""
    texts = [value]
    if "=?" not in value:
        return texts
    done: list[list[tuple[int, int, Shown]]] = []  # most Froms have one set of words
    for words in (
        [(m.start(), m.end(), m[1], m[2], m[3]) for m in _ENCODED_WORD.finditer(value)],
        list(_lenient_words(value)),
    ):
        for join in (False, True):
            decoded = _decoded_words(value, words, join)
            if decoded in done:
                continue
            done.append(decoded)
            readings: list[list[str]] = [[], [], [], []]  # charset, Latin-1; blanks dropped, kept
            pos, after_word = 0, False
            for start, end, word in decoded:
                gap = value[pos:start]
                adjacent = after_word and (not gap or gap.isspace())
                for i, parts in enumerate(readings):
                    parts.extend(("" if adjacent and i < 2 else gap, word[i % 2]))
                pos, after_word = end, True
            for parts in readings:
                text = "".join(parts) + value[pos:]
                if text not in texts:
                    texts.append(text)
    return texts


def _after_at(text: str, pos: int) -> list[str] | None:
    """The domains shown after the at sign before ``pos``: the word that follows it, past
    any blanks and comments (RFC 5322 4.4 allows CFWS around "@": ``Joe @ Home``), and the
    first word of each such comment (a reader may take ``ceo@(bank.example)x`` for
    bank.example), each cut to its host names (``_hosts``: ``Yahoo!`` is yahoo,
    ``example.com/team`` example.com); None when no host name follows (``ceo@``, ``ceo@ <``,
    ``ceo@[192.0.2.1]``, ``ceo@!``, a nested comment), or a word holds a format character."""
    m = _AFTER_AT.match(text, pos)
    if m is None:  # pragma: no cover - every part of the pattern may be empty
        return None
    words = [*_COMMENT_WORD.findall(m.group("cfws")), m.group("domain")]
    if any(unicodedata.category(c) == "Cf" for word in words for c in word):
        return None
    hosts = [_hosts(word) for word in words]
    return [host for found in hosts for host in found] if hosts[-1] else None


def _hosts(word: str) -> list[str]:
    """The host names in a word shown after an at sign, lower case, without a trailing
    dot: its first run of characters a host name may hold (``_HOST_RUN``), and each later
    one with a dot (``secure!paypal.example`` shows paypal.example too); [] when none."""
    runs = [run.rstrip(".").lower() for run in _HOST_RUN.findall(word)]
    return [run for i, run in enumerate(runs) if run and (not i or "." in run)]


def shown_domains(value: str, limit: int = SHOWN_LIMIT) -> list[str] | None:
    """Every domain a reader may be shown in a From field value ``mailbox_addresses`` cannot
    read (or reads as a group with no member): the word after each at sign (``_after_at``:
    past blanks and comments), in the raw value and in each reading of its encoded words
    (``_shown_texts``), after NFKC (a fullwidth at sign, U+FF20, is one), up to a blank, a
    special or ASCII punctuation no host name holds (``Joe @ Joe's Pizza``: joe); lower
    case, without a trailing dot, distinct, in order. [] when no at sign is there
    (``MAILER-DAEMON``, ``Automated System:;``: no domain is shown). None, "not
    understood", when a reading has no safe reading of its own: an at sign followed by no
    host name, a bidirectional override or isolate anywhere, a format character in a domain, a
    control or private character that may make a client show something else than these
    bytes, or a value longer than ``limit`` characters (``SHOWN_LIMIT``). Linear in
    ``len(value)``: each at sign reads only up to the next word, and the blanks and comments
    before it hold no other at sign but inside a comment, whose own reading ends there."""
    if len(value) > limit:
        return None
    domains: list[str] = []
    for reading in _shown_texts(value):
        text = unicodedata.normalize("NFKC", reading)
        if _BIDI.search(text) or any(
            c != "\t" and unicodedata.category(c) in _HIDDEN for c in text
        ):
            return None
        for at in re.finditer("@", text):
            shown = _after_at(text, at.end())
            if shown is None:
                return None
            domains.extend(shown)
    return list(dict.fromkeys(domains))
