"""bench.common.replace_section: how the scripts that write a section of bench/RESULTS.md (found by
its heading) replace it and keep every other section (no model runs)."""

from bench.common import replace_section

SECTION = "## Routing study"


def test_section_replaced_in_place_and_others_kept():
    text = f"# R\n\n## A\na\n\n{SECTION}\nold\n\n## B\nb\n"
    out = replace_section(text, f"{SECTION}\n\nnew\n", SECTION)
    assert out == f"# R\n\n## A\na\n\n{SECTION}\n\nnew\n\n\n## B\nb\n"
    assert replace_section(out, f"{SECTION}\n\nnewer\n", SECTION).count(SECTION) == 1


def test_a_heading_that_only_starts_with_the_title_is_another_section():
    text = f"# R\n\n{SECTION}: reading\nkept\n\n{SECTION}\nold\n"
    out = replace_section(text, f"{SECTION}\n\nnew\n", SECTION)
    assert out == f"# R\n\n{SECTION}: reading\nkept\n\n{SECTION}\n\nnew\n"


def test_section_appended_when_missing():
    assert (
        replace_section("# R\n\n## A\na\n", f"{SECTION}\n\nx\n", SECTION)
        == f"# R\n\n## A\na\n\n\n{SECTION}\n\nx\n"
    )
