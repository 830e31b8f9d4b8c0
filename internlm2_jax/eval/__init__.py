"""Evaluation suites (issue 9): perplexity, needle-in-a-haystack, exact-match tasks, JSONL chat
benchmarks and generation speed, plus plots and the gin-configurable `evaluate(workdir)` runner.

  scoring      pure answer scoring: normalize_answer, extract_number(s), exact_match, regex_match,
               contains_value
  perplexity   perplexity(config, params, batches), perplexity_suite
  needle       build_haystack, prompt_frame, needle_suite
  tasks        make_examples, run_examples, tasks_suite
  chat_bench   load_items, score_items, chat_bench_suite
  speed        measure_speed, speed_suite
  plots        needle_heatmap, scores_bar_chart (matplotlib)
  runner       evaluate, load_model, load_tokenizer
`runner` (and so the gin registration of every suite) is imported lazily by the CLI.
"""

from internlm2_jax.eval.scoring import (
    contains_value,
    exact_match,
    extract_number,
    extract_numbers,
    normalize_answer,
    regex_match,
)

__all__ = ["contains_value", "exact_match", "extract_number", "extract_numbers", "normalize_answer",
           "regex_match"]
