"""A local lm-eval task on real held-out text, for `loopscape lm-eval` offline: last-word prediction on CPython's
`pydoc_data.topics` (PSF licence; installed with Python). The held-out part is the last 10% of the topics'
text; a document is a prose line of at least 12 words, its last word (letters only) the target, the line before
it and the rest of the line the context.

    python docs/scripts/pydoc_lastword.py TASKDIR      # writes TASKDIR/pydoc_lastword.{yaml,jsonl}
    loopscape lm-eval --model loopscape --include_path TASKDIR --tasks pydoc_lastword \\
        --model_args pretrained=MODEL,layers=12:18,n_loops=2 --limit 200
"""

import json
import pydoc_data.topics
import re
import sys
from pathlib import Path


def documents() -> list[dict]:
    text = "\n".join(pydoc_data.topics.topics.values())
    lines = text[int(len(text) * 0.9) :].splitlines()
    out = []
    for before, line in zip(lines, lines[1:]):
        words = line.strip().split()
        if len(words) < 12 or not re.fullmatch(r"[A-Za-z]+[.,;:]?", words[-1]):
            continue
        target = words[-1].rstrip(".,;:")
        context = (before.strip() + "\n" + " ".join(words[:-1])).strip()
        out.append({"context": context, "target": target})
    return out


def main(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rows = documents()
    (folder / "pydoc_lastword.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (folder / "pydoc_lastword.yaml").write_text(
        "task: pydoc_lastword\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        f"  data_files:\n    test: {folder.resolve() / 'pydoc_lastword.jsonl'}\n"
        "test_split: test\n"
        "output_type: loglikelihood\n"
        'doc_to_text: "{{context}}"\n'
        'doc_to_target: " {{target}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: perplexity\n    aggregation: perplexity\n    higher_is_better: false\n",
        encoding="utf-8",
    )
    print(f"{len(rows)} documents in {folder}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
