"""A small generated corpus (no download) exercising every stage: clean English/Chinese prose,
planted near-duplicates with different timestamps, spam/junk, blocked domains and words,
long coherent and long shuffled texts, and a malformed JSONL line."""

from __future__ import annotations

import json
import pathlib
import random

_EN = ("river mill farmer grain autumn children boat timber harbor sky village market bread "
       "winter road bridge mountain forest lake teacher school garden story letter evening").split()
_FUNC = "the a of and to in was for on with as by at from that it".split()
_ZH = "春天来了河边的柳树发芽孩子们在草地上放风筝老人坐长椅聊天远处传悠扬歌声村庄市场面包冬季道路桥梁山林湖泊"


def _en_doc(rng: random.Random, n_sent: int) -> str:
    sents = []
    for _ in range(n_sent):
        ws = [rng.choice(_EN) if rng.random() < 0.55 else rng.choice(_FUNC) for _ in range(rng.randint(9, 16))]
        sents.append(" ".join(ws).capitalize() + ".")
    return "\n\n".join(" ".join(sents[i : i + 4]) for i in range(0, len(sents), 4))


def _zh_doc(rng: random.Random, n_sent: int) -> str:
    return "\n".join("".join(rng.choice(_ZH) for _ in range(rng.randint(20, 35))) + "。" for _ in range(n_sent))


def _long_doc(rng: random.Random, shuffled: bool) -> str:
    paras = []
    for t in range(8):
        vocab = [f"{chr(97 + t)}{''.join(rng.choice('bcdfghklmnprstvz') for _ in range(5))}" for _ in range(25)]
        for _ in range(rng.randint(7, 13)):
            ws = [rng.choice(vocab) if rng.random() < 0.6 else rng.choice(_FUNC) for _ in range(90)]
            paras.append(" ".join(ws).capitalize() + ".")
    if shuffled:
        rng.shuffle(paras)
    return "\n\n".join(paras)


def reference_texts(n: int = 200, seed: int = 1) -> list[str]:
    """Clean prose (English and Chinese) for fitting the quality n-gram LM."""
    rng = random.Random(seed)
    return [_en_doc(rng, 12) if i % 2 else _zh_doc(rng, 10) for i in range(n)]


def write_corpus(out_dir: str | pathlib.Path, n_docs: int = 200, seed: int = 0) -> list[str]:
    """Write ``web-*.jsonl`` files under ``out_dir``; returns their paths."""
    rng = random.Random(seed)
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    for i in range(n_docs):
        text = _en_doc(rng, 12) if i % 3 else _zh_doc(rng, 12)
        rows.append({"id": f"d{i}", "text": text, "url": f"https://site{i % 7}.example.com/p{i}",
                     "timestamp": f"2023-{1 + i % 12:02d}-01"})
        if i % 10 == 0:  # planted near-duplicate, newer
            dup = text.replace(".", "!", 1) if "." in text else text[:-2] + "！"
            rows.append({"id": f"d{i}-dup", "text": dup, "url": f"https://mirror.example.org/{i}",
                         "timestamp": "2024-06-01"})
    for i in range(10):  # junk: spam symbols, very short, bad domain, bad words
        rows.append({"id": f"spam{i}", "text": " ".join(["#buy #now ### win"] * 30)})
        rows.append({"id": f"short{i}", "text": "click here"})
        rows.append({"id": f"blocked{i}", "text": _en_doc(rng, 12), "url": f"https://casino.bad.example/{i}"})
        rows.append({"id": f"badword{i}", "text": _en_doc(rng, 12) + " hatefulword and slurword."})
    rows.append({"id": "long-coherent", "text": _long_doc(rng, False), "type": "book"})
    rows.append({"id": "long-shuffled", "text": _long_doc(random.Random(seed + 5), True), "type": "book"})
    half = len(rows) // 2
    paths = []
    for k, chunk in enumerate((rows[:half], rows[half:])):
        p = out / f"web-{k}.jsonl"
        lines = [json.dumps(r, ensure_ascii=False) for r in chunk]
        if k == 1:
            lines.insert(3, '{"id": "broken", "text": "unterminated')  # malformed line
        p.write_text("\n".join(lines) + "\n", encoding="utf-8")
        paths.append(str(p))
    (out / "empty.jsonl").write_text("", encoding="utf-8")
    paths.append(str(out / "empty.jsonl"))
    return paths
