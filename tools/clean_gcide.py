"""stdin: gcide's dictd text; stdout: one entry per paragraph, without pronunciation markup,
source tags or hard line wraps. Used by tools/get_corpus.sh."""
import re
import sys

PRONUNCIATION = re.compile(r"\\[^\\\n]*\\")  # \Ab*do"men\
SOURCE_TAG = re.compile(r"\[(1913 Webster|WordNet 1\.5|PJC|Webster 1913 Suppl\.|[A-Z][A-Za-z. ]{0,30})\]")


def entries(text: str):
    for block in re.split(r"\n\s*\n", text):
        lines = [line.strip() for line in block.splitlines()]
        if not lines or lines[0].startswith("00") or not any(lines):
            continue
        joined = " ".join(line for line in lines if line)
        joined = SOURCE_TAG.sub("", PRONUNCIATION.sub("", joined))
        joined = re.sub(r"\s+", " ", joined).strip()
        if len(joined) > 20:
            yield joined


def decode(raw: bytes) -> str:
    """UTF-8, except for the few lines in Windows-1252 (e.g. 0x92 for a right quote)."""
    return "\n".join(_line(line) for line in raw.split(b"\n"))


def _line(line: bytes) -> str:
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError:
        return line.decode("cp1252", errors="replace")


def main() -> None:
    out = open(sys.stdout.fileno(), "w", encoding="utf-8", closefd=False)
    for entry in entries(decode(sys.stdin.buffer.read())):
        out.write(entry + "\n\n")
    out.flush()


if __name__ == "__main__":
    main()
