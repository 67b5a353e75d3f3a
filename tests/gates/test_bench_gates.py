"""bench.accuracy's gate report: the issue's targets with verdicts, and hand-written notes kept."""

from pathlib import Path

from bench.accuracy import NOTES, kept_notes, targets


def m(pers: float, glob: float) -> dict:
    return {"personalized_accuracy": pers, "global_accuracy": glob}


METHODS = {"local": m(0.97, 0.33), "fedavg": m(0.76, 0.76), "fedavg_ft": m(0.973, 0.49),
           "nmoe_fedce_fedgate": m(0.97, 0.37), "nmoe_fedce_localgate_vl": m(0.95, 0.78),
           "nmoe_fedce_fedgate_vl": m(0.95, 0.79), "nmoe_fedce_fedgate_ood": m(0.96, 0.45)}


def test_targets_pick_the_most_balanced_new_method_and_say_by_how_much_it_misses() -> None:
    lines = targets(METHODS, iid=False)
    assert "`nmoe_fedce_fedgate_vl`" in lines[0]
    assert lines[1] == "- personalized: 95.00 vs best dense `fedavg_ft` 97.30 (-2.30 pts): **missed**"
    assert lines[2] == "- global: 79.00 vs fedavg 76.00 (+3.00 pts): **met**"
    assert "its local-only variant `nmoe_fedce_localgate_vl` 78.00 (+1.00 pts): **met**" in lines[3]


def test_the_averaged_body_target_falls_back_to_a_method_with_a_local_only_variant() -> None:
    methods = {**METHODS, "nmoe_fedce_fedgate_switch": m(0.96, 0.785)}
    lines = targets(methods, iid=False)
    assert "`nmoe_fedce_fedgate_switch`" in lines[0]
    assert lines[3] == ("- averaged gate body helps: global of `nmoe_fedce_fedgate_vl` 79.00 vs its local-only "
                        "variant `nmoe_fedce_localgate_vl` 78.00 (+1.00 pts): **met** "
                        "(`nmoe_fedce_fedgate_switch` has no local-only variant)")


def test_iid_target_is_within_half_a_point_of_fedavggate() -> None:
    methods = {**METHODS, "nmoe_fedce_fedavggate": m(0.953, 0.794)}
    lines = targets(methods, iid=True)
    assert lines[1].endswith("(-0.30 pts, target >= -0.50 pts): **met**")
    assert lines[2].endswith("(-0.40 pts, target >= -0.50 pts): **met**")
    lines = targets({**methods, "nmoe_fedce_fedavggate": m(0.96, 0.79)}, iid=True)
    assert lines[1].endswith("**missed**")


def test_notes_after_the_marker_survive_a_rewrite(tmp_path: Path) -> None:
    report = tmp_path / "gates.md"
    assert kept_notes(report) == []
    report.write_text(f"# generated\n| table |\n{NOTES}\nwhy it missed\n")
    assert kept_notes(report) == [NOTES, "why it missed"]
    report.write_text(f"{NOTES}\nonly notes, before the first run\n")
    assert kept_notes(report) == [NOTES, "only notes, before the first run"]
    report.write_text("# generated, no notes\n")
    assert kept_notes(report) == []
