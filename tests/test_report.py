"""Results table, plots and report.md from a synthetic metrics dict."""

from pathlib import Path

import pytest

from toolkit.report import headline, results_table, write_plots, write_report

PNG = b"\x89PNG\r\n\x1a\n"
GATES = ("rangate", "rollgate", "fedavggate", "fedgate", "localgate")


def method(p: float, g: float, up: int, clients: int = 3, **extras: object) -> dict:
    """One method's metrics; every client gets the method's accuracies."""
    return {"personalized_accuracy": p, "global_accuracy": g, "upload_bytes": up,
            "download_bytes": 2 * up,
            "per_client": [{"client": c, "personalized_accuracy": p, "global_accuracy": g}
                           for c in range(clients)], **extras}


CURVE = [{"round": 1, "personalized_accuracy": 0.5, "global_accuracy": None},
         {"round": 2, "personalized_accuracy": 0.6, "global_accuracy": 0.55}]
ROUTING = [[0.5, 0.5, 0.0], [0.0, 0.5, 0.5], [0.5, 0.0, 0.5]]


def metrics(extras: bool = True) -> dict:
    """3 clients, 2 baselines and 3 NMoE methods; curves, routing and compute if `extras`."""
    curve = {"curve": CURVE} if extras else {}
    routed = {"routing": ROUTING, **curve} if extras else {}
    out = {
        "dataset": "fashion_mnist",
        "config": {"data": {"num_clients": 3, "partition": "dirichlet", "alpha": 0.5},
                   "model": {"top_k": 2}},
        "config_hash": "ab" * 32,
        "elapsed_seconds": 125.2,
        "machine": {"platform": "Linux-test", "processor": "TestCPU", "cpus": 2,
                    "python": "3.11.7", "torch": "2.13.0"},
        "methods": {
            "nmoe_fedce_fedgate": method(0.9, 0.6, 1_500_000, **routed),
            "fedavg": method(0.8, 0.75, 1_000_000, **curve),
            "nmoe_hybrid_rangate": method(0.5, 0.5, 1_234_567, **routed),
            "local": method(0.85, 0.4, 0),
            "nmoe_fedce_fedavggate": method(0.7, 0.7, 2_000_000, **routed),
        },
    }
    if extras:
        out["compute"] = {"per_device": {"nmoe": {"macs": 1000, "params": 250, "note": "device"}}}
    return out


def test_table_orders_baselines_first_and_formats_numbers() -> None:
    lines = results_table(metrics()).splitlines()
    assert lines[0].split()[0] == "method" and set(lines[1]) == {"-", " "}
    assert [line.split()[0] for line in lines[2:]] == [
        "local", "fedavg", "nmoe_fedce_fedavggate", "nmoe_fedce_fedgate", "nmoe_hybrid_rangate"]
    assert lines[3].split()[1:] == ["80.00", "75.00", "1.00", "2.00"]
    assert lines[6].split()[1:] == ["50.00", "50.00", "1.23", "2.47"]
    assert len({len(line) for line in lines}) == 1  # aligned


def test_table_orders_all_baselines() -> None:
    m = metrics()
    m["methods"] = {n: method(0.5, 0.5, 1) for n in
                    ("nmoe_fedsc_localgate", "centralized", "fedavg_ft", "fedavg", "local")}
    names = [line.split()[0] for line in results_table(m).splitlines()[2:]]
    assert names == ["local", "fedavg", "fedavg_ft", "centralized", "nmoe_fedsc_localgate"]


def test_report_and_plots(tmp_path: Path) -> None:
    text = write_report(metrics(), tmp_path).read_text()
    assert text.startswith("# NMoE run: Fashion-MNIST, 3 clients, Dirichlet(alpha=0.5)")
    assert "TestCPU" in text and "2 min 05 s" in text
    assert "**nmoe_fedce_fedgate** (90.00%)" in text and "**fedavg** (75.00%)" in text
    assert "| fedavg | 80.00 | 75.00 | 1.00 | 2.00 |" in text
    assert text.index("| local |") < text.index("| fedavg |") < text.index("| nmoe_fedce_fedgate |")
    assert "| nmoe | 1,000 | 250 | 1.0 | device |" in text
    pngs = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert pngs == ["accuracy_per_round.png", "per_client_accuracy.png",
                    "routing_nmoe_fedce_fedavggate.png", "routing_nmoe_fedce_fedgate.png",
                    "summary.png"]
    for name in pngs:
        assert (tmp_path / "plots" / name).read_bytes()[:8] == PNG
        assert f"(plots/{name})" in text


def test_write_plots_returns_existing_pngs(tmp_path: Path) -> None:
    paths = write_plots(metrics(), tmp_path / "new" / "plots")
    assert len(paths) == 5
    for path in paths:
        assert path.stat().st_size > 0 and path.read_bytes()[:8] == PNG


def test_absent_data_skips_plots(tmp_path: Path) -> None:
    m = metrics(extras=False)
    del m["machine"], m["elapsed_seconds"], m["config_hash"]
    text = write_report(m, tmp_path).read_text()
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == [
        "per_client_accuracy.png", "summary.png"]
    assert "Compute" not in text and "accuracy_per_round" not in text


def test_no_methods(tmp_path: Path) -> None:
    m = metrics()
    m["methods"] = {}
    assert write_plots(m, tmp_path) == []
    assert "Best" not in write_report(m, tmp_path).read_text()


def test_routing_only_best_per_gate_and_crowded_per_client(tmp_path: Path) -> None:
    m = metrics()
    m["methods"] = {f"nmoe_{s}_{g}": method(0.5 + 0.01 * i, 0.5, 1, routing=ROUTING, curve=CURVE)
                    for i, (s, g) in enumerate((s, g) for s in ("fedce", "fedsc", "hybrid")
                                               for g in GATES)}
    m["methods"] |= {n: method(0.6, 0.6, 1, curve=CURVE)
                     for n in ("local", "fedavg", "fedavg_ft", "centralized")}
    names = {p.name for p in write_plots(m, tmp_path)}
    assert {n for n in names if n.startswith("routing_")} == {
        "routing_nmoe_hybrid_fedgate.png", "routing_nmoe_hybrid_fedavggate.png",
        "routing_nmoe_hybrid_localgate.png"}
    assert "per_client_accuracy.png" in names
    assert headline(m["methods"]) == ["local", "fedavg", "fedavg_ft", "centralized",
                                      *(f"nmoe_hybrid_{g}" for g in sorted(GATES))]


@pytest.mark.parametrize(("data", "expected"), [
    ({"partition": "iid"}, "IID"),
    ({"partition": "shards", "classes_per_client": 2}, "shards, 2 classes per client"),
])
def test_partition_in_title(tmp_path: Path, data: dict, expected: str) -> None:
    m = metrics(extras=False)
    m["config"]["data"] |= data
    assert write_report(m, tmp_path).read_text().splitlines()[0].endswith(f"3 clients, {expected}")
