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


def main() -> None:
    for entry in entries(sys.stdin.read()):
        sys.stdout.write(entry + "\n\n")


if __name__ == "__main__":
    main()
