"""search and open: BM25 retrieval over a local folder of documents, and reading them with line numbers.

The folder (`ctx.docs_dir`) may hold .txt, .md, .html/.htm, .pdf (text by pypdf, one `[page N]` marker line
per page) and .docx (paragraphs and tables by python-docx). Each document is split into line-numbered
lines; passages of about PASSAGE_LINES lines (overlapping by half) are ranked with Okapi BM25 (k1=1.5,
b=0.75, idf = ln(1 + (N - df + 0.5) / (df + 0.5)), Robertson & Zaragoza 2009), and `search` returns the
best documents with the lines of their best passage. A document's id is its path inside the folder.

`open` returns a document's text with line numbers, so an answer can cite "doc_id, lines a-b"; every
search and open records what was read in `ToolResult.data["citations"]` for the research report.

    index = DocumentIndex.build(Path("docs"))
    index.search("median household income", k=5)
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

from .base import Tool, ToolArgumentError, ToolContext, ToolResult, clip

SUFFIXES = (".txt", ".md", ".markdown", ".html", ".htm", ".pdf", ".docx")
PASSAGE_LINES = 12
K1, B = 1.5, 0.75
MAX_DOCUMENTS = 5000
MAX_DOC_BYTES = 50 * 1024 * 1024
_WORD = re.compile(r"[^\W_]+", re.UNICODE)
# the commonest English function words: they carry no topic and would dominate short queries' scores
_STOPWORDS = frozenset("""a an and are as at be by for from has have in is it its of on or that the this to was were
which with what who when where how why do does did not no""".split())


def tokenize(text: str) -> list[str]:
    return [w for w in (m.group().lower() for m in _WORD.finditer(text)) if w not in _STOPWORDS]


class _HTMLText(HTMLParser):
    """Visible text of an HTML page, one line per block element; the <title> kept apart."""

    _BLOCK = {"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "section", "article", "pre", "table",
              "ul", "ol", "blockquote", "header", "footer", "dt", "dd"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.title = ""
        self._skip = 0
        self._in_title = False

    def handle_starttag(self, tag, attrs):
        if tag in ("script", "style", "noscript", "template"):
            self._skip += 1
        elif tag == "title":
            self._in_title = True
        elif tag in self._BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if tag in ("script", "style", "noscript", "template"):
            self._skip = max(0, self._skip - 1)
        elif tag == "title":
            self._in_title = False
        elif tag in self._BLOCK:
            self.parts.append("\n")

    def handle_data(self, data):
        if self._in_title:
            self.title += data
        elif not self._skip:
            self.parts.append(data)


def extract_text(path: Path) -> tuple[str, str]:
    """(title, text) of one document; the title falls back to the first heading or line, then the name."""
    suffix = path.suffix.lower()
    title = ""
    if suffix == ".pdf":
        import pypdf
        reader = pypdf.PdfReader(str(path))
        pages = []
        for i, page in enumerate(reader.pages, start=1):
            pages.append(f"[page {i}]\n{(page.extract_text() or '').strip()}")
        text = "\n".join(pages)
        title = ((reader.metadata.title if reader.metadata else None) or "").strip()
    elif suffix == ".docx":
        import docx
        d = docx.Document(str(path))
        lines = [p.text for p in d.paragraphs]
        for table in d.tables:
            for row in table.rows:
                lines.append(" | ".join(c.text.strip() for c in row.cells))
        text = "\n".join(lines)
        title = (d.core_properties.title or "").strip()
    elif suffix in (".html", ".htm"):
        parser = _HTMLText()
        parser.feed(path.read_text(encoding="utf-8", errors="replace"))
        text = re.sub(r"\n\s*\n+", "\n\n", "".join(parser.parts))
        title = " ".join(parser.title.split())
    else:
        text = path.read_text(encoding="utf-8", errors="replace")
    text = "\n".join(line.rstrip() for line in text.strip().splitlines())
    if not title:
        for line in text.splitlines():
            s = line.strip().lstrip("#").strip()
            if s and not s.startswith("[page "):
                title = s[:120]
                break
    return title or path.stem, text


@dataclass
class Document:
    doc_id: str          # path inside the folder, '/'-separated
    title: str
    lines: list[str]


@dataclass
class DocumentIndex:
    root: Path
    documents: dict[str, Document] = field(default_factory=dict)
    # passages: (doc_id, first line, last line), 1-based inclusive; their term counts and lengths
    passages: list[tuple[str, int, int]] = field(default_factory=list)
    postings: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    lengths: list[int] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    signature: tuple = ()

    @staticmethod
    def files(root: Path) -> list[Path]:
        out = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            out += [Path(dirpath) / f for f in sorted(filenames)
                    if Path(f).suffix.lower() in SUFFIXES and not f.startswith(".")]
        return out[:MAX_DOCUMENTS]

    @staticmethod
    def signature_of(root: Path) -> tuple:
        sig = []
        for f in DocumentIndex.files(root):
            st = f.stat()
            sig.append((str(f), st.st_size, st.st_mtime_ns))
        return tuple(sig)

    @classmethod
    def build(cls, root: Path) -> DocumentIndex:
        index = cls(Path(root), signature=cls.signature_of(Path(root)))
        for f in cls.files(Path(root)):
            doc_id = f.relative_to(root).as_posix()
            try:
                if f.stat().st_size > MAX_DOC_BYTES:
                    raise ValueError(f"larger than {MAX_DOC_BYTES} bytes")
                title, text = extract_text(f)
            except Exception as e:      # one unreadable file does not stop the others
                index.skipped[doc_id] = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
                continue
            index.add(Document(doc_id, title, text.splitlines() or [""]))
        return index

    def add(self, doc: Document) -> None:
        self.documents[doc.doc_id] = doc
        step = max(1, PASSAGE_LINES // 2)
        n = len(doc.lines)
        starts = list(range(0, max(n - PASSAGE_LINES, 0) + 1, step))
        if starts[-1] + PASSAGE_LINES < n:          # the tail the stride stepped over
            starts.append(n - PASSAGE_LINES)
        for start in starts:
            end = min(n, start + PASSAGE_LINES)
            terms = Counter(tokenize(doc.title + "\n" + "\n".join(doc.lines[start:end])))
            pid = len(self.passages)
            self.passages.append((doc.doc_id, start + 1, end))
            self.lengths.append(sum(terms.values()))
            for term, tf in terms.items():
                self.postings.setdefault(term, []).append((pid, tf))

    def search(self, query: str, k: int = 5) -> list[dict]:
        """The k best documents: each its best passage's score, lines and a snippet."""
        terms = tokenize(query)
        if not terms or not self.passages:
            return []
        n = len(self.passages)
        avg = sum(self.lengths) / n
        scores: dict[int, float] = {}
        for term in set(terms):
            posting = self.postings.get(term)
            if not posting:
                continue
            idf = math.log(1 + (n - len(posting) + 0.5) / (len(posting) + 0.5))
            weight = idf * terms.count(term)
            for pid, tf in posting:
                norm = tf * (K1 + 1) / (tf + K1 * (1 - B + B * self.lengths[pid] / avg))
                scores[pid] = scores.get(pid, 0.0) + weight * norm
        best: dict[str, tuple[float, int]] = {}
        for pid, s in scores.items():
            doc_id = self.passages[pid][0]
            if doc_id not in best or s > best[doc_id][0]:
                best[doc_id] = (s, pid)
        ranked = sorted(best.items(), key=lambda kv: (-kv[1][0], kv[0]))[:k]
        query_terms = set(terms)
        out = []
        for doc_id, (score, pid) in ranked:
            doc = self.documents[doc_id]
            _, first, last = self.passages[pid]
            out.append({"doc_id": doc_id, "title": doc.title, "score": round(score, 4), "start_line": first,
                        "end_line": last, "snippet": _snippet(doc.lines[first - 1:last], query_terms)})
        return out


def _snippet(lines: list[str], terms: set[str], width: int = 300) -> str:
    """The passage's text around its first query term, about `width` characters."""
    text = " ".join(line.strip() for line in lines if line.strip())
    hit = next((m.start() for m in _WORD.finditer(text) if m.group().lower() in terms), 0)
    start = max(0, hit - width // 3)
    piece = text[start:start + width]
    return ("..." if start else "") + piece + ("..." if start + width < len(text) else "")


_INDEXES: dict[str, DocumentIndex] = {}


def index_for(ctx: ToolContext) -> DocumentIndex:
    """The folder's index, rebuilt when a file in it was added, removed or changed."""
    if ctx.docs_dir is None:
        raise ToolArgumentError("no document folder was given for this run (--docs)")
    root = Path(ctx.docs_dir)
    if not root.is_dir():
        raise ToolArgumentError(f"the document folder {str(root)!r} does not exist")
    key = os.path.realpath(root)
    cached = _INDEXES.get(key)
    if cached is None or cached.signature != DocumentIndex.signature_of(root):
        cached = _INDEXES[key] = DocumentIndex.build(root)
    return cached


class SearchTool(Tool):
    name = "search"
    description = ("Search the local document collection (BM25 keyword ranking). Returns the best documents "
                   "with their doc_id, title, the lines of the best passage and a snippet. Then read them with "
                   "open to quote and cite them.")
    parameters = {
        "type": "object",
        "properties": {
            "query": {"type": "string", "description": "keywords, e.g. 'median household income 2021'"},
            "k": {"type": "integer", "minimum": 1, "maximum": 20, "default": 5, "description": "how many documents"},
        },
        "required": ["query"],
    }
    modes = frozenset({"research", "write"})

    def run(self, arguments: dict, ctx: ToolContext) -> ToolResult:
        if not arguments["query"].strip():
            raise ToolArgumentError("query is empty")
        index = index_for(ctx)
        results = index.search(arguments["query"], arguments["k"])
        if not results:
            return ToolResult(f"no document matches {arguments['query']!r} ({len(index.documents)} documents "
                              "searched)", data={"results": [], "citations": []})
        lines = [f"{i}. [{r['doc_id']}] {r['title']} (lines {r['start_line']}-{r['end_line']}, "
                 f"score {r['score']:.2f})\n   {r['snippet']}" for i, r in enumerate(results, 1)]
        citations = [{"doc_id": r["doc_id"], "title": r["title"], "start_line": r["start_line"],
                      "end_line": r["end_line"], "via": "search"} for r in results]
        return ToolResult(clip("\n".join(lines)), data={"results": results, "citations": citations})


class OpenTool(Tool):
    name = "open"
    description = ("Open a document from the collection by its doc_id (from search) and read its text with "
                   "line numbers, from start_line. Cite what you use as [doc_id, lines a-b].")
    parameters = {
        "type": "object",
        "properties": {
            "doc_id": {"type": "string", "description": "the doc_id search returned"},
            "start_line": {"type": "integer", "minimum": 1, "default": 1},
            "max_lines": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 120},
        },
        "required": ["doc_id"],
    }
    modes = frozenset({"research", "write"})

    def run(self, arguments: dict, ctx: ToolContext) -> ToolResult:
        index = index_for(ctx)
        doc = index.documents.get(arguments["doc_id"])
        if doc is None:
            if arguments["doc_id"] in index.skipped:
                return ToolResult(f"{arguments['doc_id']} could not be read: {index.skipped[arguments['doc_id']]}",
                                  ok=False)
            close = [d for d in index.documents if arguments["doc_id"].lower() in d.lower()][:5]
            raise ToolArgumentError(f"no document {arguments['doc_id']!r}" +
                                    (f"; did you mean {', '.join(close)}?" if close else "; use search to find doc_ids"))
        start = arguments["start_line"]
        if start > len(doc.lines):
            raise ToolArgumentError(f"{doc.doc_id} has {len(doc.lines)} lines; start_line {start} is past its end")
        shown = doc.lines[start - 1:start - 1 + arguments["max_lines"]]
        end = start + len(shown) - 1
        body = "\n".join(f"{start + i:>5}  {line}" for i, line in enumerate(shown))
        header = f"[{doc.doc_id}] {doc.title} — lines {start}-{end} of {len(doc.lines)}"
        if end < len(doc.lines):
            body += f"\n... {len(doc.lines) - end} more lines (start_line={end + 1})"
        offset = sum(len(line) + 1 for line in doc.lines[:start - 1])
        citation = {"doc_id": doc.doc_id, "title": doc.title, "start_line": start, "end_line": end,
                    "char_offset": offset, "via": "open"}
        return ToolResult(clip(f"{header}\n{body}"), data={"citations": [citation], "lines": len(doc.lines)})
