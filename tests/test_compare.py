"""bench/compare.py's report: the markdown table and the RESULTS.md section it replaces (no model runs)."""
from bench.compare import SECTION, format_table, replace_section

BASE = {"name": "base", "eval_s": 12.0,
        "results": {"exact_match": {"add": 0.0, "sort": 0.5}, "perplexity": {"english/tech_support": 20.0}}}
MOE = {"name": "params_top2", "lmoe": {"num_experts": 4, "rank": 4, "composition": "params", "router": "topk",
                                       "top_k": 2},
       "results": {"exact_match": {"add": 0.25, "sort": 0.75}, "perplexity": {"english/tech_support": 10.0}},
       "trainable": 1234567, "train_s": 100.0, "wall_s": 130.0, "active": {"mean": 2.0, "min": 2.0, "max": 2.0}}


def test_table_rows_and_cells():
    lines = format_table([BASE, MOE], steps=50).splitlines()
    assert lines[0] == ("| config | trainable params | EM add | EM sort | EM mean | ppl tech_support | ppl mean | "
                        "train s | s/step | wall s | active experts mean (min-max over layers) |")
    assert lines[2].startswith("| base: base model (no adapter) | - | 0.00 | 0.50 | 0.250 | 20.00 | 20.00 | - | - | 12 (eval) | -")
    assert lines[3] == ("| params_top2: 4x r=4 params / top-2 | 1,234,567 | 0.25 | 0.75 | 0.500 | 10.00 | 10.00 | "
                        "100 | 2.00 | 130 | 2.00 (2.00-2.00) |")


def test_section_replaced_in_place_and_others_kept():
    text = f"# R\n\n## A\na\n\n{SECTION}\nold\n\n## B\nb\n"
    out = replace_section(text, f"{SECTION}\n\nnew\n")
    assert out == f"# R\n\n## A\na\n\n{SECTION}\n\nnew\n\n\n## B\nb\n"
    assert replace_section(out, f"{SECTION}\n\nnewer\n").count(SECTION) == 1


def test_section_appended_when_missing():
    assert replace_section("# R\n\n## A\na\n", f"{SECTION}\n\nx\n") == f"# R\n\n## A\na\n\n\n{SECTION}\n\nx\n"
