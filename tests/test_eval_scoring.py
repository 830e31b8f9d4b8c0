"""Eval scoring on hand-made outputs: normalization, number extraction, exact / regex / needle matching."""

import json

import pytest

from internlm2_jax.eval import chat_bench, tasks
from internlm2_jax.eval.runner import summary_scores
from internlm2_jax.eval.scoring import (
    contains_value,
    exact_match,
    extract_number,
    extract_numbers,
    first_line,
    normalize_answer,
    regex_match,
)


@pytest.mark.parametrize("text,expected", [
    ("The answer is: Paris.", "paris"),
    ("  An  Apple, a PEAR!  ", "apple pear"),
    ("Answer: 1,024", "1024"),
    ("-3.5 degrees", "-3.5 degrees"),
    ("well-known<|im_end|>", "well known"),
    ("Ｐａｒｉｓ", "paris"),  # NFKC full-width
])
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


@pytest.mark.parametrize("text,numbers", [
    ("I have 3 apples and 12 pears", ["3", "12"]),
    ("total: 1,024,000 tokens", ["1024000"]),
    ("it is -7, or +8", ["-7", "8"]),
    ("3.50 and 007 and 2.0", ["3.5", "7", "2"]),
    ("no digits here", []),
    ("ends with 42.", ["42"]),
])
def test_extract_numbers(text, numbers):
    assert extract_numbers(text) == numbers
    assert extract_number(text) == (numbers[0] if numbers else None)
    assert extract_number(text, "last") == (numbers[-1] if numbers else None)


@pytest.mark.parametrize("pred,ref,ok", [
    ("81", "81", True),
    ("The answer is 81.", "81", True),
    ("81 apples\nbecause 40 + 41", "81", True),
    ("\n\n 81", "81", True),
    ("8 1", "81", False),
    ("810", "81", False),
    ("The answer is 18", "81", False),
    ("paris", "Paris", True),
    ("The answer is: Paris.", "paris", True),
    ("Paris, France", "Paris", False),
    ("1,024", "1024", True),
    ("81<|im_end|>", "81", True),
    ("", "81", False),
])
def test_exact_match(pred, ref, ok):
    assert exact_match(pred, ref) is ok


def test_regex_match_and_bad_pattern():
    assert regex_match("Yes, it is.", r"^\W*yes\b")
    assert not regex_match("Not yes", r"^\W*yes\b")
    assert regex_match("1, 2,3", r"1\s*,\s*2\s*,\s*3")
    assert regex_match("line one\nLINE TWO", r"one.line two")  # DOTALL + ignorecase
    with pytest.raises(ValueError, match="bad regex"):
        regex_match("x", "(unclosed")


@pytest.mark.parametrize("pred,ok", [
    ("The secret number is 4721.", True),
    ("4721", True),
    ("It's 4,721!", True),
    ("4 7 2 1", True),
    ("47210", False),
    ("14721", False),
    ("4712", False),
    ("", False),
])
def test_needle_answer_detection(pred, ok):
    assert contains_value(pred, "4721") is ok


def test_first_line():
    assert first_line("\n  42 \nmore") == "42"
    assert first_line("<|im_end|>") == ""


def test_generated_task_references_are_correct():
    for ex in tasks.make_examples("add", 20) + tasks.make_examples("subtract", 20) + \
            tasks.make_examples("multiply", 20):
        a, op, b = ex.messages[-1]["content"][len("What is "):-1].split()
        assert str({"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]) == ex.reference
    for ex in tasks.make_examples("word", 10):
        nums = [int(n) for n in extract_numbers(ex.messages[-1]["content"])]
        assert ex.reference == str(sum(nums))
    for ex in tasks.make_examples("lookup", 10):
        q = ex.messages[-1]["content"]
        who = q.rsplit("Where does ", 1)[1].split(" ")[0]
        assert f"{who} lives in {ex.reference}." in q
    assert tasks.make_examples("add", 5, seed=1) == tasks.make_examples("add", 5, seed=1)
    assert tasks.make_examples("add", 5)[0].messages[0]["role"] == "system"
    with pytest.raises(ValueError, match="unknown task"):
        tasks.make_examples("nope", 1)


def test_chat_bench_items_and_scoring(tmp_path):
    path = tmp_path / "bench.jsonl"
    rows = [{"prompt": "2+2?", "reference": "4"},
            {"messages": [{"role": "user", "content": "Is ice cold?"}], "reference": r"^\W*yes", "scoring": "regex"},
            {"id": "c", "prompt": "Capital of France?", "reference": "Paris", "scoring": "exact"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    items = chat_bench.load_items(str(path))
    assert [it["scoring"] for it in items] == ["exact", "regex", "exact"]
    assert items[0]["messages"] == [{"role": "user", "content": "2+2?"}] and items[2]["id"] == "c"
    assert chat_bench.score_items(items, ["The answer is 4", "yes!", "Rome"]) == [True, True, False]
    for bad, msg in [({"reference": "x"}, "prompt"), ({"prompt": "p"}, "reference"),
                     ({"prompt": "p", "reference": "x", "scoring": "fuzzy"}, "unknown scoring"),
                     ({"prompt": "p", "reference": "(", "scoring": "regex"}, "bad regex")]:
        path.write_text(json.dumps(bad) + "\n")
        with pytest.raises(ValueError, match=msg):
            chat_bench.load_items(str(path))


def test_summary_scores_skips_errors():
    suites = {"needle": {"mean": 0.5}, "tasks": {"tasks": {"add": {"accuracy": 1.0}}},
              "chat_bench": {"error": "boom"}, "perplexity": {"accuracy": 0.25}, "speed": {"runs": []}}
    assert summary_scores(suites) == {"needle (mean)": 0.5, "tasks: add": 1.0, "perplexity: next-token acc": 0.25}
