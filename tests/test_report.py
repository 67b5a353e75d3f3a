"""Results table, plots and report.md from a metrics dict."""

from pathlib import Path

from toolkit.report import results_table, write_report

PNG = b"\x89PNG\r\n\x1a\n"


def metrics(with_extras: bool = True) -> dict:
    def method(p: float, g: float, up: int, extras: dict | None = None) -> dict:
        m = {"personalized_accuracy": p, "global_accuracy": g, "upload_bytes": up, "download_bytes": 2 * up,
             "per_client": [{"client": c, "personalized_accuracy": p, "global_accuracy": g} for c in range(3)]}
        return {**m, **(extras or {})} if with_extras else m

    curve = {"curve": [{"round": 1, "personalized_accuracy": 0.5, "global_accuracy": None},
                       {"round": 2, "personalized_accuracy": 0.6, "global_accuracy": 0.55}]}
    routing = {"routing": [[0.5, 0.5, 0.0], [0.0, 0.5, 0.5], [0.5, 0.0, 0.5]], **curve}
    out = {"dataset": "synthetic",
           "config": {"data": {"dataset": "synthetic", "num_clients": 3, "partition": "dirichlet", "alpha": 0.5,
                               "classes_per_client": 2}},
           "methods": {"nmoe_fedce_fedgate": method(0.9, 0.6, 1_500_000, routing),
                       "fedavg": method(0.8, 0.75, 1_000_000, curve),
                       "local": method(0.85, 0.4, 0),
                       "nmoe_fedce_fedavggate": method(0.7, 0.7, 2_000_000, routing)}}
    if with_extras:
        out["compute"] = {"per_device": {"nmoe": {"macs": 1000, "params": 250, "note": "device"}}}
    return out


def test_table_orders_baselines_first_and_formats_numbers() -> None:
    lines = results_table(metrics()).splitlines()
    assert [line.split()[0] for line in lines[2:]] == [
        "local", "fedavg", "nmoe_fedce_fedavggate", "nmoe_fedce_fedgate"]
    assert lines[3].split()[1:] == ["80.00", "75.00", "1.00", "2.00"]


def test_report_and_plots(tmp_path: Path) -> None:
    report = write_report(metrics(), tmp_path)
    text = report.read_text()
    assert "synthetic, 3 clients, Dirichlet(alpha=0.5)" in text
    assert "**nmoe_fedce_fedgate** (90.00%)" in text and "**fedavg** (75.00%)" in text
    assert "| nmoe | 1,000 | 250 | 1.0 | device |" in text
    pngs = sorted(p.name for p in (tmp_path / "plots").glob("*.png"))
    assert pngs == ["accuracy_per_round.png", "per_client_accuracy.png", "routing_nmoe_fedce_fedavggate.png",
                    "routing_nmoe_fedce_fedgate.png", "summary.png"]
    for name in pngs:
        assert (tmp_path / "plots" / name).read_bytes()[:8] == PNG
        assert f"(plots/{name})" in text


def test_absent_data_skips_plots(tmp_path: Path) -> None:
    write_report(metrics(with_extras=False), tmp_path)
    assert sorted(p.name for p in (tmp_path / "plots").glob("*.png")) == ["per_client_accuracy.png", "summary.png"]
    assert "Compute" not in (tmp_path / "report.md").read_text()
